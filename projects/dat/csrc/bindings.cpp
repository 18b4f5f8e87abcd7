// The Python module of the C++ CPU kernels (one extension, built from every file of csrc/).
#include <torch/extension.h>

#include <vector>

void deformable_bias(torch::Tensor bias, torch::Tensor table, torch::Tensor iy, torch::Tensor fy, torch::Tensor ix,
                     torch::Tensor fx, torch::Tensor x_taps);
void deformable_bias_backward(torch::Tensor grad_bias, torch::Tensor table, torch::Tensor iy, torch::Tensor fy,
                              torch::Tensor ix, torch::Tensor fx, torch::Tensor x_taps, torch::Tensor grad_table,
                              torch::Tensor grad_fy_heads, torch::Tensor grad_fx_heads);
std::vector<torch::Tensor> neighborhood_attention_forward(torch::Tensor q, torch::Tensor k, torch::Tensor v,
                                                          torch::Tensor rpb, int64_t kernel_size);
std::vector<torch::Tensor> neighborhood_attention_backward(torch::Tensor grad_out, torch::Tensor q, torch::Tensor k,
                                                           torch::Tensor v, torch::Tensor rpb, torch::Tensor out,
                                                           torch::Tensor lse, int64_t kernel_size);

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("deformable_bias", &deformable_bias, "Deformable relative position bias (float32, CPU)");
  m.def("deformable_bias_backward", &deformable_bias_backward, "Gradient of deformable_bias");
  m.def("neighborhood_attention_forward", &neighborhood_attention_forward,
        "Neighbourhood attention: output and log-sum-exp (float32, CPU)");
  m.def("neighborhood_attention_backward", &neighborhood_attention_backward,
        "Gradients of neighbourhood attention (q, k, v and the per-(batch, head) bias table)");
}
