# DAT-B (v1) fine-tuned at 384x384 from the 224 ImageNet-1k model (LeapLabTHU/DAT
# at tag CVPR2022, configs/dat_base_384.yaml).
# - Backbone 'dat-b-384': window 12 and deformable bias tables built for 384
#   (img_size=384), drop path 0.5 as in the original 384 config.
# - 30 epochs, no warm-up, weight decay 1e-8; 8 GPUs x 24 images = batch 192.
#   lr = 2e-6 x 192 / 512 = 7.5e-7, cosine to 1e-7 x 192 / 512 = 3.75e-8
#   (ratio 0.05); gradient clipping 5.0 (the trainer default; the 1.0 of the
#   224 run belongs to that config only).
# - Same training augmentation as at 224 with 384 crops; test: resize the
#   short side to int(384 / 0.875) = 438 (bicubic), centre crop 384.
# - Initialisation from the whole converted 224 classifier, as the original
#   fine-tuning did: the backbone's Pretrained init resizes the window-7 Swin
#   bias tables (13x13) to window 12 (23x23) and the deformable tables to the
#   384 map sizes (bicubic); the head loads unchanged.
_base_ = './dat-b_8xb128_in1k.py'

checkpoint_224 = 'checkpoints/dat-b_in1k_converted.pth'
model = dict(
    backbone=dict(
        arch='dat-b-384',
        img_size=384,
        drop_path_rate=0.5,
        init_cfg=dict(type='Pretrained', checkpoint=checkpoint_224, prefix='backbone.'),
    ),
    head=dict(
        init_cfg=dict(
            _delete_=True,  # replaces the 224 config's init_cfg=None
            type='Pretrained',
            checkpoint=checkpoint_224,
            prefix='head.',
        )
    ),
)

train_pipeline = [
    dict(type='LoadImageFromFile'),
    dict(type='RandomResizedCrop', scale=384, backend='pillow', interpolation='bicubic'),
    dict(type='RandomFlip', prob=0.5, direction='horizontal'),
    dict(
        type='RandAugment',
        policies='timm_increasing',
        num_policies=2,
        total_level=10,
        magnitude_level=9,
        magnitude_std=0.5,
        hparams=dict(pad_val=[104, 116, 124], interpolation='bicubic'),
    ),
    dict(
        type='RandomErasing',
        erase_prob=0.25,
        mode='rand',
        min_area_ratio=0.02,
        max_area_ratio=1 / 3,
        fill_color=[103.53, 116.28, 123.675],
        fill_std=[57.375, 57.12, 58.395],
    ),
    dict(type='PackInputs'),
]
test_pipeline = [
    dict(type='LoadImageFromFile'),
    dict(type='ResizeEdge', scale=438, edge='short', backend='pillow', interpolation='bicubic'),
    dict(type='CenterCrop', crop_size=384),
    dict(type='PackInputs'),
]
train_dataloader = dict(batch_size=24, dataset=dict(pipeline=train_pipeline))
val_dataloader = dict(batch_size=24, dataset=dict(pipeline=test_pipeline))
test_dataloader = val_dataloader

optim_wrapper = dict(optimizer=dict(lr=2e-6 * 192 / 512, weight_decay=1e-8), clip_grad=dict(max_norm=5.0))
param_scheduler = [
    dict(
        type='CosineAnnealingLR', eta_min_ratio=1e-7 / 2e-6, by_epoch=True, begin=0, end=30, convert_to_iter_based=True
    ),
]
train_cfg = dict(max_epochs=30)
auto_scale_lr = dict(base_batch_size=192)
