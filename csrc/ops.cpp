// Every op of the fastddpm library, declared once. Kernels register with
// TORCH_LIBRARY_IMPL in csrc/cpu/<op>.cpp and csrc/cuda/<op>_cuda.cpp; Python
// adds fake (meta) implementations and autograd in fastddpm/ops/_library.py.
#include <torch/library.h>

#ifndef FASTDDPM_NO_PYTHON
#include <Python.h>
extern "C" {
// Importing fastddpm._C loads this library, which runs the registrations below.
PyMODINIT_FUNC PyInit__C(void) {
  static struct PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, nullptr};
  return PyModule_Create(&module_def);
}
}
#endif

TORCH_LIBRARY(fastddpm, m) {
  // x_t = sqrt(abar_t) x0 + sqrt(1 - abar_t) noise, per-sample t; with with_v also
  // v = sqrt(abar_t) noise - sqrt(1 - abar_t) x0 in the same pass (else an empty tensor).
  m.def(
      "q_sample(Tensor x0, Tensor noise, Tensor t, Tensor sqrt_alphas_cumprod, "
      "Tensor sqrt_one_minus_alphas_cumprod, bool with_v) -> (Tensor, Tensor)");
  // One reverse step of DDPM (diffusers' DDPMScheduler.step). noise_mode: 0 none,
  // 1 the noise tensor, 2 in-kernel Philox (seed, offset). Codes in elementwise.h. Any prev_t < 0
  // is the end of the chain (abar_prev = 1), as diffusers reads it. The Philox counter offset is
  // offset plus, where given, the 0-d int64 offset_tensor on sample's device, read inside the kernel
  // (no host sync), so a CUDA graph replays the step with a new offset. diffusers_beta: beta_t evaluated
  // as diffusers does (elementwise.h step_beta), for the drop-in schedulers' numbers.
  // Returns (prev_sample, pred_original_sample or an empty tensor).
  m.def(
      "ddpm_step(Tensor sample, Tensor model_output, Tensor t, Tensor prev_t, "
      "Tensor alphas_cumprod, Tensor? noise, Tensor? predicted_variance, int seed, int offset, "
      "int noise_mode, int prediction_type, int variance_type, float clip_range, "
      "bool return_pred, Tensor? offset_tensor=None, bool diffusers_beta=False) -> (Tensor, Tensor)");
  // ddpm_step with z = torch.randn(sample.shape, generator=generator, dtype=sample.dtype),
  // drawn by torch's own normal_ (so the numbers and the generator's state afterwards are
  // torch's), CPU only, fixed variance types. On two or more threads the draw, which is
  // serial, runs on the calling thread while another computes the posterior mean.
  m.def(
      "ddpm_step_randn(Tensor sample, Tensor model_output, Tensor t, Tensor prev_t, "
      "Tensor alphas_cumprod, Generator? generator, int prediction_type, int variance_type, "
      "float clip_range, bool return_pred, bool diffusers_beta=False) -> (Tensor, Tensor)");
  // Fills a float32 tensor with the Philox normals that ddpm_step's noise_mode 2
  // adds: element i (row-major) gets normal(seed, offset + i).
  m.def("philox_normal_(Tensor(a!) out, int seed, int offset) -> ()");
  // One DDIM step (diffusers' DDIMScheduler.step, Song et al. 2021 eq. 12); abar_prev is
  // final_alpha_cumprod where prev_t < 0; noise (modes as ddpm_step, offset_tensor too) is added when
  // eta > 0. use_clipped_model_output: eps recomputed from the clipped x0 for the direction to x_t.
  // Returns (prev_sample, pred_original_sample or an empty tensor).
  m.def(
      "ddim_step(Tensor sample, Tensor model_output, Tensor t, Tensor prev_t, Tensor alphas_cumprod, "
      "float final_alpha_cumprod, Tensor? noise, int seed, int offset, int noise_mode, "
      "int prediction_type, float eta, float clip_range, bool use_clipped_model_output, "
      "bool return_pred, Tensor? offset_tensor=None, bool diffusers_beta=False) -> (Tensor, Tensor)");
  // One DPM-Solver++(2M) update (diffusers' DPMSolverMultistepScheduler, dpmsolver++, midpoint): from
  // sample at t to prev_t (< 0: sigma = 0, the first-order step to x0), second order when prev_x0 (the x0
  // prediction made at last_t > t) is given. Per-element math in dpmpp_step.h.
  // Returns (prev_sample, the clipped x0 prediction or an empty tensor).
  m.def(
      "dpmpp_step(Tensor sample, Tensor model_output, Tensor? prev_x0, Tensor t, Tensor prev_t, "
      "Tensor? last_t, Tensor alphas_cumprod, int prediction_type, float clip_range, "
      "bool return_pred) -> (Tensor, Tensor)");
  // The raw Philox4x32-10 words of counters offset .. offset + n - 1 into an
  // int32 tensor of shape (n, 4).
  m.def("philox_bits_(Tensor(a!) out, int seed, int offset) -> ()");
  // GroupNorm (+ SiLU when silu) over x + shift[:, :, None, ...] for x (N, C, *spatial),
  // NCHW or channels_last; shift (N, C) is optional. Returns (y in x's layout, mean (N, G) and
  // rstd (N, G) of x + shift, fp32). Its autograd is registered in csrc/autograd.cpp.
  m.def(
      "group_norm_silu_fwd(Tensor x, Tensor? weight, Tensor? bias, Tensor? shift, int num_groups, "
      "float eps, bool silu) -> (Tensor, Tensor, Tensor)");
  // The same forward returning y alone, for calls that record no autograd graph (inference):
  // no statistics tensors to allocate and hand back.
  m.def(
      "group_norm_silu(Tensor x, Tensor? weight, Tensor? bias, Tensor? shift, int num_groups, float eps, "
      "bool silu) -> Tensor");
  // Its backward from x and the saved mean/rstd: (dx, dweight or empty, dbias or empty,
  // dshift or empty).
  m.def(
      "group_norm_silu_bwd(Tensor grad_y, Tensor x, Tensor? shift, Tensor mean, Tensor rstd, "
      "Tensor? weight, Tensor? bias, int num_groups, bool silu) -> (Tensor, Tensor, Tensor, Tensor)");
}
