"""The gate's flow on the tiny budget: trains, scores drawn and erased held-out shots,
writes its numbers, resumes; the numbers checked against a forward pass of its checkpoint."""
import json
from dataclasses import replace

import pytest
import torch

from train import gate, study


@pytest.fixture(scope="module")
def tiny_gate(tmp_path_factory):
    out = tmp_path_factory.mktemp("gate")
    return out, gate.run_gate(study.BUDGETS["tiny"], out, held_out=3)


def test_gate_writes_its_numbers_beside_chance(tiny_gate):
    out, result = tiny_gate
    budget = study.BUDGETS["tiny"]
    assert json.loads((out / "gate.json").read_text()) == json.loads(json.dumps(result, default=str))
    assert result["chance"] == pytest.approx(1 / budget.identities)
    for name in ("present", "erased"):
        score = result["network"][name]
        assert score["images"] == 3 * budget.identities
        assert score["top1"] == score["correct"] / score["images"]
        low, high = score["interval95"]
        assert 0 <= low <= score["top1"] <= high <= 1
    present, erased = result["network"]["present"], result["network"]["erased"]
    assert result["passed"]["present"] == (present["top1"] >= 10 * result["chance"]
                                           and present["interval95"][0] > result["chance"])
    assert result["passed"]["erased"] == (erased["interval95"][0] <= result["chance"])
    assert set(result["nearest_neighbour"]) == {"outer features", "inner-part features"}
    assert result["train_seconds"] > 0 and not result["resumed"]


def test_gate_scores_are_the_checkpoints_own(tiny_gate):
    from models import build_head
    from train.checkpoint import load_checkpoint, model_from_state
    from train.data.synthetic import INNER_PARTS, SyntheticFaces

    out, result = tiny_gate
    budget = study.BUDGETS["tiny"]
    state = load_checkpoint(next((out / "runs").glob("softmax-seed0/checkpoints/last.pt")))
    model, config = model_from_state(state)
    head = build_head("softmax", config.model.embedding_dim, budget.identities)
    head.load_state_dict(state["head"])
    per = budget.images_per_identity + 3
    for name, erase in (("present", ()), ("erased", INNER_PARTS)):
        faces = SyntheticFaces(budget.identities, per, size=budget.input_size, jitter=budget.jitter,
                               erase=erase)
        held_out = [i for i in range(len(faces)) if i % per >= budget.images_per_identity]
        with torch.no_grad():
            logits = head.eval()(model(torch.stack([faces[i]["image"] for i in held_out])).embedding)
        labels = torch.tensor([faces.label(i) for i in held_out])
        assert result["network"][name]["correct"] == int((logits.argmax(1) == labels).sum()), name


def test_gate_resumes_and_refuses_the_outer_world(tiny_gate):
    out, result = tiny_gate
    again = gate.run_gate(study.BUDGETS["tiny"], out, held_out=3)
    assert again["resumed"] and again["network"] == result["network"]
    with pytest.raises(ValueError, match="budget.identity must be 'parts'"):
        gate.run_gate(replace(study.BUDGETS["tiny"], identity="outer"), out)
