// The Python module of the C++ CPU kernels (one extension, built from every file of csrc/).
#include <torch/extension.h>

#include <vector>

std::vector<torch::Tensor> deformable_attention_forward(torch::Tensor q, torch::Tensor k, torch::Tensor v,
                                                        double scale, torch::Tensor table, torch::Tensor iy,
                                                        torch::Tensor fy, torch::Tensor ix, torch::Tensor fx,
                                                        torch::Tensor x_taps);
std::vector<torch::Tensor> deformable_attention_backward(torch::Tensor grad_out, torch::Tensor q, torch::Tensor k,
                                                         torch::Tensor v, torch::Tensor lse, double scale,
                                                         torch::Tensor table, torch::Tensor iy,
                                                         torch::Tensor fy, torch::Tensor ix, torch::Tensor fx,
                                                         torch::Tensor x_taps);
torch::Tensor depthwise_conv_gelu_forward(torch::Tensor y, torch::Tensor weight, torch::Tensor bias);
std::vector<torch::Tensor> depthwise_conv_gelu_backward(torch::Tensor grad_out, torch::Tensor y, torch::Tensor weight,
                                                        torch::Tensor bias, bool with_output);
std::vector<torch::Tensor> neighborhood_attention_forward(torch::Tensor q, torch::Tensor k, torch::Tensor v,
                                                          torch::Tensor rpb, int64_t kernel_size, double scale);
std::vector<torch::Tensor> neighborhood_attention_backward(torch::Tensor grad_out, torch::Tensor q, torch::Tensor k,
                                                           torch::Tensor v, torch::Tensor rpb, torch::Tensor out,
                                                           torch::Tensor lse, int64_t kernel_size, double scale);
torch::Tensor sample_keys_forward(torch::Tensor x, torch::Tensor pos, int64_t groups);
std::vector<torch::Tensor> sample_keys_backward(torch::Tensor grad_out, torch::Tensor x, torch::Tensor pos,
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
