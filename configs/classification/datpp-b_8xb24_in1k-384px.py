# DAT-B++ fine-tuned at 384x384 from the 224 ImageNet-1k model (LeapLabTHU/DAT
# configs/dat_base_384.yaml).
# - Backbone 'datpp-b' built at img_size=224, as the released 384 model was
#   (`img_size: 224` in that original config): DAT++
#   stretches its bias tables over any map size. Drop path 0.6 (same file).
# - 30 epochs, no warm-up, weight decay 1e-8; 8 GPUs x 24 images = batch 192.
#   lr = 2e-5 x 192 / 512 = 7.5e-6, cosine to 2e-7 x 192 / 512 = 7.5e-8
#   (ratio 0.01). The warm-up lr 2e-8 of the original config is unused with
#   0 warm-up epochs. Gradient clipping 5.0.
# - Same training augmentation as at 224 with 384 crops; test without crop:
#   resize the whole image to 384x384 (bicubic).
# - Initialisation from the whole converted 224 classifier, as the original
#   fine-tuning did (the shapes match).
_base_ = './datpp-b_16xb64_in1k.py'

checkpoint_224 = 'checkpoints/datpp-b_in1k_converted.pth'
model = dict(
    backbone=dict(
        img_size=224,
        drop_path_rate=0.6,
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
    dict(type='Resize', scale=384, backend='pillow', interpolation='bicubic'),
    dict(type='PackInputs'),
]
train_dataloader = dict(batch_size=24, dataset=dict(pipeline=train_pipeline))
val_dataloader = dict(batch_size=24, dataset=dict(pipeline=test_pipeline))
test_dataloader = val_dataloader

optim_wrapper = dict(optimizer=dict(lr=2e-5 * 192 / 512, weight_decay=1e-8))
param_scheduler = [
    dict(
        type='CosineAnnealingLR', eta_min_ratio=2e-7 / 2e-5, by_epoch=True, begin=0, end=30, convert_to_iter_based=True
    ),
]
train_cfg = dict(max_epochs=30)
auto_scale_lr = dict(base_batch_size=192)
