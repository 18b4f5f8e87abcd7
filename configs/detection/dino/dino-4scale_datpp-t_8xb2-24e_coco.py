# DINO 4-scale, DAT-T++, 24 epochs: the 12-epoch config with the schedule of mmdet's
# dino-4scale_r50_8xb2-24e_coco.py (24 epochs, lr divided by 10 after epoch 20), which
# changes nothing else. Drop path stays 0.0: DAT++ published no 24-epoch detector to take a
# value from, and mmdet's 24e config keeps its model. No published number exists for it.
_base_ = './dino-4scale_datpp-t_8xb2-12e_coco.py'

max_epochs = 24
train_cfg = dict(max_epochs=max_epochs)
param_scheduler = [dict(type='MultiStepLR', begin=0, end=max_epochs, by_epoch=True, milestones=[20], gamma=0.1)]
