# UperNet, DAT-B (v1, 128..1024 channels), ADE20K 160k: the DAT-T recipe
# (Swin's, drop path 0.3).
_base_ = './upernet_dat-t_8xb2-160k_ade20k-512x512.py'

model = dict(
    backbone=dict(arch='dat-b', init_cfg=dict(checkpoint='checkpoints/dat-b_in1k_converted.pth')),
    decode_head=dict(in_channels=[128, 256, 512, 1024]),
    auxiliary_head=dict(in_channels=512),
)
