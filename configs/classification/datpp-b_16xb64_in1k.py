# DAT-B++ (128..1024 channels) on ImageNet-1k at 224: the DAT-T++ recipe with
# drop path 0.7 and 64 images per GPU (LeapLabTHU/DAT configs/dat_base.yaml);
# 16 GPUs x 64 = 1024 keeps
# the total batch, hence lr 1e-3, warm-up and minimum lr unchanged.
_base_ = './datpp-t_8xb128_in1k.py'

model = dict(backbone=dict(arch='datpp-b', drop_path_rate=0.7), head=dict(in_channels=1024))

train_dataloader = dict(batch_size=64)  # x 16 GPUs = 1024 images
