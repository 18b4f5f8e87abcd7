# Mask2Former, DAT-T++ backbone, COCO instance segmentation, large-scale jitter, 50 epochs.
# Not in the DAT++ papers and never released by LeapLabTHU/DAT: no published number exists.
# The segmentor, data and schedule are mmdet's mask2former_r50_8xb2-lsj-50e_coco.py,
# unchanged, as mmdet's mask2former_swin-t-p4-w7-224_8xb2-lsj-50e_coco.py keeps them: the
# panoptic recipe (see mask2former_datpp-t_8xb2-lsj-50e_coco-panoptic.py) with 80 thing
# classes and no stuff, instance annotations, test at 1333x800, CocoMetric (box and mask AP).
# The backbone is that of the panoptic config: DAT-T++ outputs 0-3, drop path 0.3, gradient
# checkpointing, no weight decay on its norms and bias tables.
_base_ = [
    'mmdet::mask2former/mask2former_r50_8xb2-lsj-50e_coco.py',
    '../../_base_/datpp_query_heads.py',
]
custom_imports = dict(imports=['projects.dat'], allow_failed_imports=False)
runner_type = 'DATRunner'  # mmengine's Runner that checks the dataset paths first (projects/dat/runner.py)
# Crash-safe checkpoint writes (projects/dat/hooks.py); interval etc. stay those of the base.
default_hooks = dict(checkpoint=dict(type='AtomicCheckpointHook'))

model = dict(
    backbone=dict(
        _delete_=True,
        type='DAT',
        arch='datpp-t',
        out_indices=(0, 1, 2, 3),
        drop_path_rate=0.3,
        with_cp=True,
        init_cfg=dict(type='Pretrained', checkpoint='checkpoints/datpp-t_in1k_converted.pth', prefix='backbone.'),
    ),
    panoptic_head=dict(in_channels=[64, 128, 256, 512]),
)

optim_wrapper = dict(paramwise_cfg=dict(custom_keys={{_base_.datpp_backbone_keys}}))

# mmdet's instance config keeps the panoptic base's `data_prefix.seg` (panoptic PNG folders),
# which CocoDataset never reads; DATRunner checks every dataset path before training, so the
# unused one goes.
train_dataloader = dict(dataset=dict(data_prefix=dict(_delete_=True, img='train2017/')))
val_dataloader = dict(dataset=dict(data_prefix=dict(_delete_=True, img='val2017/')))
test_dataloader = val_dataloader
