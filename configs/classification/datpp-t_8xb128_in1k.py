# DAT-T++ (64..512 channels) on ImageNet-1k at 224: the same recipe as DAT-T
# (batch 8 x 128 = 1024, lr 5e-4 x 1024 / 512 = 1e-3, 20 warm-up epochs,
# cosine to 1e-5, clipping 5.0, the same augmentation), drop path 0.2. The
# DAT++ trainer's --amp autocasts to bfloat16.
_base_ = './dat-t_8xb128_in1k.py'

model = dict(backbone=dict(arch='datpp-t', drop_path_rate=0.2), head=dict(in_channels=512))

optim_wrapper = dict(dtype='bfloat16')
