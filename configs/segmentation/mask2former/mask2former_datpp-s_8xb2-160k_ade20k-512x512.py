# Mask2Former, DAT-S++ (96..768 channels), ADE20K 512x512, 160k: the DAT-T++ config with drop
# path 0.5, as our DAT-S++ UperNet 160k (the released LeapLabTHU/DAT-Segmentation config
# upn_small_160k_dp05_lr6.py). No published number exists for it.
_base_ = './mask2former_datpp-t_8xb2-160k_ade20k-512x512.py'

model = dict(
    backbone=dict(
        arch='datpp-s', drop_path_rate=0.5, init_cfg=dict(checkpoint='checkpoints/datpp-s_in1k_converted.pth')
    ),
    decode_head=dict(in_channels=[96, 192, 384, 768]),
)
