// The schema of the ECLoss kernels (namespace ecloss_fast_C), their Meta (shape-only)
// implementations, the argument checks both devices share, and the Python module that
// loading ecloss_fast._C runs. The kernels register per device: cpu_kernels.cpp (CPU) and
// cuda_ops.cpp (CUDA). Semantics: the backend contract, docs/design.md section 9.
#include <Python.h>

#include <ATen/ATen.h>
#include <torch/library.h>

#include <c10/util/StringUtil.h>

#include <iterator>
#include <string>
#include <vector>

#include "ecloss_build_info.h"
#include "ecloss_layout.h"
#include "ecloss_ops.h"

namespace ecloss {

static_assert(std::size(kPrecisionNames) == static_cast<size_t>(Precision::kBf16) + 1,
              "kPrecisionNames names every Precision, in its order");

std::vector<std::string> precision_names() {
  return {std::begin(kPrecisionNames), std::end(kPrecisionNames)};
}

Precision parse_precision(c10::string_view precision) {
  for (size_t i = 0; i < std::size(kPrecisionNames); ++i) {
    if (precision == kPrecisionNames[i]) return static_cast<Precision>(i);
  }
  TORCH_CHECK_VALUE(false, "precision must be one of ", c10::Join(", ", precision_names()),
                    ", got '", precision, "'");
}

std::vector<int64_t> operand_layout() { return {kTemplateTile, kPixelStep}; }

at::ScalarType accumulation_type(at::ScalarType input_type) {
  return input_type == at::kDouble ? at::kDouble : at::kFloat;
}

void check_arguments(const char* op, const at::Tensor& x, const at::Tensor& templates,
                     std::initializer_list<const at::Tensor*> row_tensors,
                     const std::optional<at::Tensor>& prior) {
  TORCH_CHECK_VALUE(x.dim() == 3, op, ": x must be (B, C, K), got shape ", x.sizes());
  TORCH_CHECK_TYPE(at::isFloatingType(x.scalar_type()), op,
                   ": x must be floating, got ", x.scalar_type());
  TORCH_CHECK_VALUE(x.is_contiguous(), op, ": x must be contiguous");
  const auto accumulation = accumulation_type(x.scalar_type());
  TORCH_CHECK_VALUE(templates.dim() == 2 && templates.size(1) == x.size(2) &&
                        templates.size(0) >= 1,
                    op, ": templates must be (N, K) with K = ", x.size(2), ", got shape ",
                    templates.sizes());
  TORCH_CHECK_TYPE(templates.scalar_type() == accumulation, op, ": templates must be ",
                   accumulation, " for ", x.scalar_type(), " input, got ",
                   templates.scalar_type());
  TORCH_CHECK_VALUE(templates.is_contiguous(), op, ": templates must be contiguous");
  TORCH_CHECK_VALUE(templates.device() == x.device(), op, ": templates are on ",
                    templates.device(), " but x is on ", x.device());
  for (const at::Tensor* row : row_tensors) {
    TORCH_CHECK_VALUE(row->dim() == 2 && row->size(0) == x.size(0) &&
                          row->size(1) == x.size(1),
                      op, ": per-row statistics must be (B, C) = (", x.size(0), ", ",
                      x.size(1), "), got shape ", row->sizes());
    TORCH_CHECK_TYPE(row->scalar_type() == accumulation, op,
                     ": per-row statistics must be ", accumulation, ", got ",
                     row->scalar_type());
    TORCH_CHECK_VALUE(row->device() == x.device(), op, ": per-row statistics are on ",
                      row->device(), " but x is on ", x.device());
  }
  if (prior.has_value()) {
    TORCH_CHECK_VALUE(prior->dim() == 2 && prior->size(0) == x.size(1) &&
                          prior->size(1) == templates.size(0),
                      op, ": prior must be (C, N) = (", x.size(1), ", ", templates.size(0),
                      "), got shape ", prior->sizes());
    TORCH_CHECK_TYPE(prior->scalar_type() == accumulation, op, ": prior must be ",
                     accumulation, ", got ", prior->scalar_type());
    TORCH_CHECK_VALUE(prior->device() == x.device(), op, ": prior is on ", prior->device(),
                      " but x is on ", x.device());
  }
}

at::Tensor checked_input_grad_from_scores(const at::Tensor& scores, const at::Tensor& templates,
                                          std::initializer_list<const at::Tensor*> row_tensors,
                                          const std::optional<at::Tensor>& prior,
                                          c10::string_view precision) {
  const char* op = "input_grad_from_scores";
  TORCH_CHECK_VALUE(scores.dim() == 3 && templates.dim() == 2 &&
                        scores.size(2) == templates.size(0),
                    op, ": scores must be (B, C, N) with N = ",
                    templates.dim() == 2 ? templates.size(0) : -1, " templates, got shape ",
                    scores.sizes());
  TORCH_CHECK_TYPE(scores.scalar_type() == templates.scalar_type(), op, ": scores must be ",
                   templates.scalar_type(), " as the templates, got ", scores.scalar_type());
  TORCH_CHECK_VALUE(scores.device() == templates.device(), op, ": scores are on ",
                    scores.device(), " but templates are on ", templates.device());
  at::Tensor dx = at::empty({scores.size(0), scores.size(1), templates.size(1)},
                            templates.options());
  check_arguments(op, dx, templates, row_tensors, prior);
  parse_precision(precision);
  return dx;
}

namespace {

at::Tensor input_grad_from_scores_meta(const at::Tensor& scores, const at::Tensor& templates,
                                       double tau, const at::Tensor& row_max,
                                       const at::Tensor& log_sum, const at::Tensor& neg_entropy,
                                       const std::optional<at::Tensor>& prior,
                                       const at::Tensor& row_weight, c10::string_view precision,
                                       const std::optional<at::Tensor>&) {
  return checked_input_grad_from_scores(scores, templates,
                                        {&row_max, &log_sum, &neg_entropy, &row_weight}, prior,
                                        precision);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> row_stats_meta(const at::Tensor& x,
                                                              const at::Tensor& templates,
                                                              double tau,
                                                              c10::string_view precision,
                                                              const std::optional<at::Tensor>&) {
  check_arguments("row_stats", x, templates, {}, std::nullopt);
  parse_precision(precision);
  const auto options = x.options().dtype(accumulation_type(x.scalar_type()));
  return {at::empty({x.size(0), x.size(1)}, options), at::empty({x.size(0), x.size(1)}, options),
          at::empty({x.size(0), x.size(1)}, options)};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> row_stats_with_scores_meta(
    const at::Tensor& x, const at::Tensor& templates, double tau, c10::string_view precision,
    const std::optional<at::Tensor>& operand_templates) {
  auto [row_max, log_sum, neg_entropy] =
      row_stats_meta(x, templates, tau, precision, operand_templates);
  return {row_max, log_sum, neg_entropy,
          at::empty({x.size(0), x.size(1), templates.size(0)}, row_max.options())};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> row_stats_with_grad_meta(
    const at::Tensor& x, const at::Tensor& templates, double tau, c10::string_view precision,
    const std::optional<at::Tensor>& operand_templates) {
  auto [row_max, log_sum, neg_entropy] =
      row_stats_meta(x, templates, tau, precision, operand_templates);
  return {row_max, log_sum, neg_entropy, at::empty(x.sizes(), row_max.options())};
}

at::Tensor column_sums_meta(const at::Tensor& x, const at::Tensor& templates, double tau,
                            const at::Tensor& row_max, const at::Tensor& log_sum,
                            c10::string_view precision, const std::optional<at::Tensor>&) {
  check_arguments("column_sums", x, templates, {&row_max, &log_sum}, std::nullopt);
  parse_precision(precision);
  return at::empty({x.size(1), templates.size(0)}, row_max.options());
}

at::Tensor input_grad_meta(const at::Tensor& x, const at::Tensor& templates, double tau,
                           const at::Tensor& row_max, const at::Tensor& log_sum,
                           const at::Tensor& neg_entropy, const std::optional<at::Tensor>& prior,
                           const at::Tensor& row_weight, c10::string_view precision,
                           const std::optional<at::Tensor>&) {
  check_arguments("input_grad", x, templates, {&row_max, &log_sum, &neg_entropy, &row_weight},
                  prior);
  parse_precision(precision);
  return at::empty_like(x);
}

}  // namespace
}  // namespace ecloss

// operand_templates: the CUDA kernels read templates from this padded copy in the operand
// type (ecloss_fast/backends/cpp_cuda.py makes and caches it; csrc/cuda_ops.cpp checks
// it); the CPU kernels pack their own from templates and ignore it. precisions() and
// operand_layout() give the Python side the names and the layout above, to check its own
// against (ecloss_fast/_precision.py, ecloss_fast/backends/cpp_cuda.py).
TORCH_LIBRARY(ecloss_fast_C, m) {
  m.def("precisions() -> str[]", &ecloss::precision_names);
  m.def("operand_layout() -> int[]", &ecloss::operand_layout);
  m.def(
      "row_stats(Tensor x, Tensor templates, float tau, str precision, "
      "Tensor? operand_templates=None) -> (Tensor, Tensor, Tensor)");
  m.def(
      "row_stats_with_grad(Tensor x, Tensor templates, float tau, str precision, "
      "Tensor? operand_templates=None) -> (Tensor, Tensor, Tensor, Tensor)");
  m.def(
      "column_sums(Tensor x, Tensor templates, float tau, Tensor row_max, Tensor log_sum, "
      "str precision, Tensor? operand_templates=None) -> Tensor");
  m.def(
      "input_grad(Tensor x, Tensor templates, float tau, Tensor row_max, Tensor log_sum, "
      "Tensor neg_entropy, Tensor? prior, Tensor row_weight, str precision, "
      "Tensor? operand_templates=None) -> Tensor");
  m.def(
      "row_stats_with_scores(Tensor x, Tensor templates, float tau, str precision, "
      "Tensor? operand_templates=None) -> (Tensor, Tensor, Tensor, Tensor)");
  m.def(
      "input_grad_from_scores(Tensor scores, Tensor templates, float tau, Tensor row_max, "
      "Tensor log_sum, Tensor neg_entropy, Tensor? prior, Tensor row_weight, str precision, "
      "Tensor? operand_templates=None) -> Tensor");
}

TORCH_LIBRARY_IMPL(ecloss_fast_C, Meta, m) {
  m.impl("row_stats", &ecloss::row_stats_meta);
  m.impl("row_stats_with_grad", &ecloss::row_stats_with_grad_meta);
  m.impl("column_sums", &ecloss::column_sums_meta);
  m.impl("input_grad", &ecloss::input_grad_meta);
  m.impl("row_stats_with_scores", &ecloss::row_stats_with_scores_meta);
  m.impl("input_grad_from_scores", &ecloss::input_grad_from_scores_meta);
}

// The torch this extension was built against, for ecloss_fast/_build_info.py to read from the
// file without loading it (setup.py writes ecloss_build_info.h). Kept by `used` and exported,
// so neither the compiler nor the linker drops it.
extern "C" __attribute__((used, visibility("default"))) const char ecloss_fast_built_against[] =
    "ecloss-fast extension built against torch " ECLOSS_FAST_TORCH_VERSION;

// Importing ecloss_fast._C only has to run the registrations above (static initialisers);
// the module itself is empty. Python calls the kernels through torch.ops.ecloss_fast_C.
extern "C" PyMODINIT_FUNC PyInit__C(void) {
  static PyModuleDef module = {PyModuleDef_HEAD_INIT, "_C",
                               "ECLoss C++/CUDA kernels, registered as torch.ops.ecloss_fast_C.*",
                               -1, nullptr};
  return PyModule_Create(&module);
}
