# UperNet, DAT-S++ (96..768 channels), ADE20K 160k: the DAT-T++ recipe with
# drop path 0.5 (LeapLabTHU/DAT-Segmentation configs/dat/upn_small_160k_dp05_lr6.py).
_base_ = './upernet_datpp-t_8xb2-160k_ade20k-512x512.py'

model = dict(
    backbone=dict(
        arch='datpp-s', drop_path_rate=0.5, init_cfg=dict(checkpoint='checkpoints/datpp-s_in1k_converted.pth')
    ),
    decode_head=dict(in_channels=[96, 192, 384, 768]),
    auxiliary_head=dict(in_channels=384),
)
