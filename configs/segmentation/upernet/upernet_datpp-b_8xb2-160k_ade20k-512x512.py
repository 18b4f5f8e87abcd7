# UperNet, DAT-B++ (128..1024 channels), ADE20K 160k: the DAT-T++ recipe with
# drop path 0.7, trained in full precision as the released DAT++ UperNet-B
# config (LeapLabTHU/DAT-Segmentation configs/dat/upn_base_160k_dp07_lr6.py).
_base_ = './upernet_datpp-t_8xb2-160k_ade20k-512x512.py'

model = dict(
    backbone=dict(
        arch='datpp-b', drop_path_rate=0.7, init_cfg=dict(checkpoint='checkpoints/datpp-b_in1k_converted.pth')
    ),
    decode_head=dict(in_channels=[128, 256, 512, 1024]),
    auxiliary_head=dict(in_channels=512),
)

optim_wrapper = dict(type='OptimWrapper')  # fp32
