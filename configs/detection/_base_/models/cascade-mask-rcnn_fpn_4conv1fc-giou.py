# Cascade Mask R-CNN with Swin's box heads, as used by DAT and DAT++
# (LeapLabTHU/DAT-Detection configs/_base_/models/cascade_mask_rcnn_dat_fpn.py):
# each of the three stages has 4 shared 3x3 convs (256 channels, SyncBN) and
# 1 fc (1024), class-specific regression of decoded boxes with GIoU loss x10.
# Everything else (FPN with 5 levels, RPN, mask head, assigners) is mmdet's
# Cascade Mask R-CNN base. The backbone is replaced by each config.
#
# SyncBN needs a distributed run. For one CPU/GPU, override the heads' norm:
#   --cfg-options model.roi_head.bbox_head.0.norm_cfg.type=BN \
#                 model.roi_head.bbox_head.1.norm_cfg.type=BN \
#                 model.roi_head.bbox_head.2.norm_cfg.type=BN
_base_ = 'mmdet::_base_/models/cascade-mask-rcnn_r50_fpn.py'

# The box-delta normalisation of the three stages (mmdet's cascade values).
cascade_target_stds = [
    [0.1, 0.1, 0.2, 0.2],
    [0.05, 0.05, 0.1, 0.1],
    [0.033, 0.033, 0.067, 0.067],
]
model = dict(
    roi_head=dict(
        bbox_head=[
            dict(
                type='ConvFCBBoxHead',
                num_shared_convs=4,
                num_shared_fcs=1,
                in_channels=256,
                conv_out_channels=256,
                fc_out_channels=1024,
                roi_feat_size=7,
                num_classes=80,
                bbox_coder=dict(type='DeltaXYWHBBoxCoder', target_means=[0.0, 0.0, 0.0, 0.0], target_stds=stds),
                reg_class_agnostic=False,
                reg_decoded_bbox=True,
                norm_cfg=dict(type='SyncBN', requires_grad=True),
                loss_cls=dict(type='CrossEntropyLoss', use_sigmoid=False, loss_weight=1.0),
                loss_bbox=dict(type='GIoULoss', loss_weight=10.0),
            )
            for stds in cascade_target_stds
        ]
    )
)
