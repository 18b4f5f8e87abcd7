# DAT-S++ (96..768 channels) on ImageNet-1k at 224: the DAT-T++ recipe with
# drop path 0.4.
_base_ = './datpp-t_8xb128_in1k.py'

model = dict(backbone=dict(arch='datpp-s', drop_path_rate=0.4), head=dict(in_channels=768))
