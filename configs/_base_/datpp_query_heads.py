# Parameter-wise optimiser rules for a DAT++ backbone under a query-based head (DINO,
# Mask2Former), used by configs/detection/dino, configs/detection/mask2former and
# configs/segmentation/mask2former, which list this file among their bases and merge
# `datpp_backbone_keys` into `optim_wrapper.paramwise_cfg.custom_keys`.
#
# mmdet's and mmseg's DINO and Mask2Former configs train the backbone at 0.1 x lr through the
# custom key 'backbone'. mmengine applies only the longest custom key found in a parameter's
# name, so the 'backbone' key would hide the rules of our other DAT++ configs (no weight decay
# on norms and on the bias tables `rpe_table` and `rpb`, keys 'norm' / 'rpb' being shorter).
# Hence, as mmdet's and mmseg's Mask2Former Swin configs do, one key per backbone norm, each
# longer than 'backbone' and carrying its 0.1 lr multiplier:
# - the stem's norms, the block norms (norm1, norm2), the downsampling norms and the output
#   norms (`backbone.norm<i>`), all LayerNorms;
# - the LayerNorm inside each deformable block's offset network (`attn.conv_offset.1`);
# - the bias tables: `rpe_table` (deformable blocks), `attn.rpb` (neighbourhood blocks).
# Outside the backbone nothing changes: the heads keep their toolbox's rules.

# Blocks per stage of DAT-T++, DAT-S++ and DAT-B++ alike (DAT++, arXiv 2309.01430, Table 1).
datpp_depths = [2, 4, 18, 2]
datpp_backbone_no_decay = dict(lr_mult=0.1, decay_mult=0.0)
datpp_backbone_keys = {
    'backbone': dict(lr_mult=0.1, decay_mult=1.0),
    'backbone.stem.norm': datpp_backbone_no_decay,
    'backbone.norm': datpp_backbone_no_decay,
    'attn.conv_offset.1': datpp_backbone_no_decay,
    'rpe_table': datpp_backbone_no_decay,
    'attn.rpb': datpp_backbone_no_decay,
    **{f'backbone.stages.{stage}.downsample.norm': datpp_backbone_no_decay for stage in range(1, 4)},
    **{
        f'backbone.stages.{stage}.blocks.{block}.norm': datpp_backbone_no_decay
        for stage, depth in enumerate(datpp_depths)
        for block in range(depth)
    },
}
# The same with Mask2Former's own keys (those of mmdet's and mmseg's R-50 Mask2Former bases:
# query and level embeddings at lr x 1 without weight decay), for a config whose base holds
# another backbone's keys that have to go (mmseg's Swin-B Mask2Former).
datpp_mask2former_keys = {
    **datpp_backbone_keys,
    **{name: dict(lr_mult=1.0, decay_mult=0.0) for name in ('query_embed', 'query_feat', 'level_embed')},
}
