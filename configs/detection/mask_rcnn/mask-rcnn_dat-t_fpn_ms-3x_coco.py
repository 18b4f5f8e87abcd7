# Mask R-CNN, DAT-T (v1), 3x with multi-scale training: the 1x recipe (Swin's)
# over 36 epochs = 3 x 12, lr divided by 10 after epochs 27 and 33; drop path
# stays 0.2 as in Swin-T's 3x config.
_base_ = './mask-rcnn_dat-t_fpn_1x_coco.py'

max_epochs = 36
train_cfg = dict(max_epochs=max_epochs)
param_scheduler = [
    dict(type='LinearLR', start_factor=0.001, by_epoch=False, begin=0, end=500),
    dict(type='MultiStepLR', begin=0, end=max_epochs, by_epoch=True, milestones=[27, 33], gamma=0.1),
]
