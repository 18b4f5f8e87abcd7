# The AdamW schedule of `schedule_adamw_1x.py` stretched to 3x:
# 36 epochs = 3 x 12, lr divided by 10 after epochs 27 and 33 (the original
# 3x configs, LeapLabTHU/DAT-Detection configs/dat/*_3x_*.py);
# same 500-iteration linear warm-up.
_base_ = './schedule_adamw_1x.py'

max_epochs = 36
train_cfg = dict(max_epochs=max_epochs)
param_scheduler = [
    dict(type='LinearLR', start_factor=0.001, by_epoch=False, begin=0, end=500),
    dict(type='MultiStepLR', begin=0, end=max_epochs, by_epoch=True, milestones=[27, 33], gamma=0.1),
]
