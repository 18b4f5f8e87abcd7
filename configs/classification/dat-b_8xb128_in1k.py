# DAT-B (v1, 128..1024 channels) on ImageNet-1k at 224: the DAT-T recipe with
# drop path 0.5 and DAT-B's own schedule (LeapLabTHU/DAT at tag CVPR2022,
# configs/dat_base.yaml): base lr 4e-4 per 512
# images, so lr = 4e-4 x 1024 / 512 = 8e-4; 50 warm-up epochs from
# 5e-7 x 2 = 1e-6 (start factor 1e-6 / 8e-4); minimum lr 5e-6 x 2 = 1e-5
# (ratio 1e-5 / 8e-4); gradient clipping at norm 1.0.
_base_ = './dat-t_8xb128_in1k.py'

model = dict(backbone=dict(arch='dat-b', drop_path_rate=0.5), head=dict(in_channels=1024))

optim_wrapper = dict(optimizer=dict(lr=4e-4 * 1024 / 512), clip_grad=dict(max_norm=1.0))
param_scheduler = [
    dict(type='LinearLR', start_factor=5e-7 / 4e-4, by_epoch=True, begin=0, end=50, convert_to_iter_based=True),
    dict(
        type='CosineAnnealingLR',
        eta_min_ratio=5e-6 / 4e-4,
        by_epoch=True,
        begin=50,
        end=300,
        convert_to_iter_based=True,
    ),
]
