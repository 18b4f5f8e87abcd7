# Mask R-CNN, DAT-T++, 3x schedule with multi-scale training, COCO.
# As the 1x config (same batch 64, lr 4e-4, AMP, checkpointing, DETR-style
# multi-scale augmentation) but 36 epochs = 3 x 12 with the lr divided by 10
# after epochs 27 and 33, and drop path 0.3 (LeapLabTHU/DAT-Detection
# configs/dat/mrcn_tiny_3x_4n_dp03_lr4.py).
_base_ = './mask-rcnn_datpp-t_fpn_1x_coco.py'

model = dict(backbone=dict(drop_path_rate=0.3))

max_epochs = 36
train_cfg = dict(max_epochs=max_epochs)
param_scheduler = [
    dict(type='LinearLR', start_factor=0.001, by_epoch=False, begin=0, end=500),
    dict(type='MultiStepLR', begin=0, end=max_epochs, by_epoch=True, milestones=[27, 33], gamma=0.1),
]
