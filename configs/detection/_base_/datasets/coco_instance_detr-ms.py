# COCO instance segmentation (boxes + masks) with the DETR-style multi-scale
# augmentation that DAT and DAT++ use for every COCO schedule, 1x included
# (LeapLabTHU/DAT-Detection configs/dat/*.py, the `AutoAugment` of their
# train_pipeline). Per image, one of two branches is drawn with equal probability:
#   (a) resize the short side to one of 480, 512, ..., 800 (step 32) with the
#       long side capped at 1333;
#   (b) resize to (400|500|600) x 1333, crop a random 384..600 patch, then
#       resize as in (a).
# Horizontal flip with probability 0.5. Testing resizes to 1333x800 (the mmdet
# base, unchanged).
_base_ = 'mmdet::_base_/datasets/coco_instance.py'

# (480, 1333), (512, 1333), ..., (800, 1333): 11 short sides, step 32.
detr_ms_scales = [(short, 1333) for short in range(480, 801, 32)]

train_pipeline = [
    dict(type='LoadImageFromFile', backend_args=None),
    dict(type='LoadAnnotations', with_bbox=True, with_mask=True),
    dict(type='RandomFlip', prob=0.5),
    dict(
        type='RandomChoice',
        transforms=[
            [dict(type='RandomChoiceResize', scales=detr_ms_scales, keep_ratio=True)],
            [
                dict(type='RandomChoiceResize', scales=[(400, 1333), (500, 1333), (600, 1333)], keep_ratio=True),
                dict(type='RandomCrop', crop_type='absolute_range', crop_size=(384, 600), allow_negative_crop=True),
                dict(type='RandomChoiceResize', scales=detr_ms_scales, keep_ratio=True),
            ],
        ],
    ),
    dict(type='PackDetInputs'),
]
train_dataloader = dict(dataset=dict(pipeline=train_pipeline))
