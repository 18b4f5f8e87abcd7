# Optimiser and schedule shared by the DAT and DAT++ COCO configs (as in the
# original configs, LeapLabTHU/DAT-Detection configs/dat/*.py).
# - AdamW, betas (0.9, 0.999), weight decay 0.05, no layer-wise decay.
# - No weight decay on norms (the backbone's LayerNorms are named `...norm...`;
#   `norm_decay_mult` also covers the SyncBN layers of the Cascade heads) nor
#   on the bias tables: `rpe_table` (deformable blocks),
#   `relative_position_bias_table` (v1 Swin window blocks), `rpb` (DAT++
#   neighbourhood blocks).
# - Mixed precision (fp16 autocast, dynamic loss scale). Configs trained in
#   fp32 (Cascade S++/B++) switch to `type='OptimWrapper'`.
# - The mmdet base is kept as is: 1x = 12 epochs, lr divided by 10 after
#   epochs 8 and 11, linear warm-up over 500 iterations from 0.001 x lr.
# The lr below is Swin's 1e-4 for 16 images; every detector config sets its
# own lr together with `auto_scale_lr.base_batch_size`.
_base_ = 'mmdet::_base_/schedules/schedule_1x.py'

optim_wrapper = dict(
    type='AmpOptimWrapper',
    optimizer=dict(_delete_=True, type='AdamW', lr=1e-4, betas=(0.9, 0.999), weight_decay=0.05),
    paramwise_cfg=dict(
        norm_decay_mult=0.0,
        custom_keys={
            'norm': dict(decay_mult=0.0),
            'rpe_table': dict(decay_mult=0.0),
            'relative_position_bias_table': dict(decay_mult=0.0),
            'rpb': dict(decay_mult=0.0),
        },
    ),
)
