# DAT-S (v1) on ImageNet-1k at 224: the DAT-T recipe (batch 8 x 128 = 1024,
# lr 1e-3, 20 warm-up epochs, clipping 5.0) with drop path 0.3.
_base_ = './dat-t_8xb128_in1k.py'

model = dict(backbone=dict(arch='dat-s', drop_path_rate=0.3))
