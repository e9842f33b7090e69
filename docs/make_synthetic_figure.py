"""Draw ``docs/synthetic_faces.png``: the synthetic faces of the parts world.

    python docs/make_synthetic_figure.py --out docs/synthetic_faces.png

One column per identity: four shots (outline, hair and skin drawn anew each time; brows,
eyes, nose and mouth the identity's), the first shot's part masks and landmarks, and the
first shot with the inner parts erased (what the gate's network sees in its second test).
"""
from __future__ import annotations

import argparse

from train.data.synthetic import INNER_PARTS, SyntheticFaces, contact_sheet


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="docs/synthetic_faces.png")
    parser.add_argument("--identity", choices=["parts", "outer"], default="parts")
    args = parser.parse_args(argv)
    faces = SyntheticFaces(6, 4, size=96, seed=0, identity=args.identity)
    sheet = contact_sheet(faces, identities=6, shots=4, erase=INNER_PARTS)
    sheet.quantize(256).save(args.out, optimize=True)  # 256 colours: a third of the size
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
