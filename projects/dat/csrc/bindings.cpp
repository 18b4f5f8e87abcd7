// The Python module of the C++ CPU kernels (one extension, built from every file of csrc/).
// Only this file needs pybind11 and its tensor conversions; the kernels include ATen's tensor and
// per-operator headers. torch/extension.h (the whole C++ frontend) took 24 of each file's 27 s
// to compile.
#include <torch/csrc/utils/pybind.h>

#include <vector>

std::vector<at::Tensor> deformable_attention_forward(at::Tensor q, at::Tensor k, at::Tensor v,
                                                     double scale, at::Tensor table, at::Tensor iy,
                                                     at::Tensor fy, at::Tensor ix, at::Tensor fx,
                                                     at::Tensor x_taps);
std::vector<at::Tensor> deformable_attention_backward(at::Tensor grad_out, at::Tensor q, at::Tensor k,
                                                      at::Tensor v, at::Tensor lse, double scale,
                                                      at::Tensor table, at::Tensor iy,
                                                      at::Tensor fy, at::Tensor ix, at::Tensor fx,
                                                      at::Tensor x_taps);
at::Tensor depthwise_conv_gelu_forward(at::Tensor y, at::Tensor weight, at::Tensor bias);
std::vector<at::Tensor> depthwise_conv_gelu_backward(at::Tensor grad_out, at::Tensor y, at::Tensor weight,
                                                     at::Tensor bias, bool with_output);
std::vector<at::Tensor> neighborhood_attention_forward(at::Tensor q, at::Tensor k, at::Tensor v,
                                                       at::Tensor rpb, int64_t kernel_size, double scale);
std::vector<at::Tensor> neighborhood_attention_backward(at::Tensor grad_out, at::Tensor q, at::Tensor k,
                                                        at::Tensor v, at::Tensor rpb, at::Tensor out,
                                                        at::Tensor lse, int64_t kernel_size, double scale);
at::Tensor sample_keys_forward(at::Tensor x, at::Tensor pos, int64_t groups);
std::vector<at::Tensor> sample_keys_backward(at::Tensor grad_out, at::Tensor x, at::Tensor pos,
                                             int64_t groups);

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("deformable_attention_forward", &deformable_attention_forward,
        "Deformable attention with the bias read on the fly: output and log-sum-exp (float32, CPU)");
  m.def("deformable_attention_backward", &deformable_attention_backward,
        "Gradients of deformable attention (q, k, v, the padded tables and the keys' table coordinates)");
  m.def("depthwise_conv_gelu_forward", &depthwise_conv_gelu_forward,
        "GELU(depth-wise conv + bias) of a (B, H, W, C) map: ConvFFN's hidden layer (float32, CPU)");
  m.def("depthwise_conv_gelu_backward", &depthwise_conv_gelu_backward,
        "Gradients of depthwise_conv_gelu_forward (y, weight, bias), and with with_output its output");
  m.def("neighborhood_attention_forward", &neighborhood_attention_forward,
        "Neighbourhood attention: output and log-sum-exp (float32, CPU)");
  m.def("neighborhood_attention_backward", &neighborhood_attention_backward,
        "Gradients of neighbourhood attention (q, k, v and the per-(batch, head) bias table)");
  m.def("sample_keys_forward", &sample_keys_forward,
        "Each group's keys read bilinearly from a (B, H, W, C) map at their positions (float32, CPU)");
  m.def("sample_keys_backward", &sample_keys_backward, "Gradients of sample_keys_forward (x and the positions)");
}
