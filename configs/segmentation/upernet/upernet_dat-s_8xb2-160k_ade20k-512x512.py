# UperNet, DAT-S (v1, 96..768 channels), ADE20K 160k: the DAT-T recipe
# (Swin's, drop path 0.3).
_base_ = './upernet_dat-t_8xb2-160k_ade20k-512x512.py'

model = dict(backbone=dict(arch='dat-s', init_cfg=dict(checkpoint='checkpoints/dat-s_in1k_converted.pth')))
