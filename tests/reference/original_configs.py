"""The ADE20K configs of the original, transcribed file by file (independently
of configs/common.py) so tests can compare every config x variant with them.

Source: OpenGVLab/InternVL-MMDetSeg, mmsegmentation/configs/. Keys: depth and
pretrain_size (backbone), out_indices, drop_path_rate, freeze_vit, optimizer lr /
weight_decay / layer_decay_rate (num_layers = depth), lr_config warmup_iters,
max_iters (from _base_/schedules/schedule_*.py), test_cfg crop/stride, the test
resize of the dataset config (SETR_Resize = short side to the crop; Resize =
keep-ratio fit into img_scale), decode head kind, auxiliary in_index, and the
evaluation/checkpoint intervals (1000 in every file: evaluation interval=1000,
save_best='auto'; checkpoint interval=1000, max_keep_ckpts=2). The adapter's
file adds crop/scale/stride/size_divisor/patch (COMMON's otherwise) and its
adapter arguments.
"""

COMMON = dict(lr=4e-5, batch=16, crop=504, stride=322, scale=(2016, 504), eval_every=1000,
              checkpoint_every=1000, max_keep=2)

_448 = ('448_v1_0', '448_v1_2', '448_v1_5', '448_v2_5')


def _files():
  out = {}
  # intern_vit_6b/linear_probing/linear_intern_vit_6b_504_80k_ade20k_bs16_lr4e-5_frozen.py
  out[('linear_frozen', '224')] = dict(
      depth=48, pretrain_size=224, out_indices=[44], drop_path=0.0, freeze=True,
      weight_decay=0.0, layer_decay=1.0, warmup=1500, steps=80000, head='linear', aux=None,
      resize='short_side')
  # intern_vit_6b_448px_v*/linear_probing/linear_intern_vit_6b_448px_v*_504_80k_ade20k_bs16_lr4e-5_frozen.py
  for v in _448:
    out[('linear_frozen', v)] = dict(
        depth=45, pretrain_size=448, out_indices=[44], drop_path=0.0, freeze=True,
        weight_decay=0.0, layer_decay=1.0, warmup=1500, steps=80000, head='linear', aux=None,
        resize='short_side')
  # intern_vit_6b/head_tuning/upernet_intern_vit_6b_504_80k_ade20k_bs16_lr4e-5_frozen.py
  out[('upernet_frozen', '224')] = dict(
      depth=48, pretrain_size=224, out_indices=[11, 23, 35, 47], drop_path=0.0, freeze=True,
      weight_decay=0.05, layer_decay=1.0, warmup=1500, steps=80000, head='uper', aux=1,
      resize='short_side')
  # intern_vit_6b_448px_v*/head_tuning/upernet_intern_vit_6b_448px_v*_504_80k_ade20k_bs16_lr4e-5_frozen.py
  for v in _448:
    out[('upernet_frozen', v)] = dict(
        depth=45, pretrain_size=448, out_indices=[11, 22, 33, 44], drop_path=0.0, freeze=True,
        weight_decay=0.05, layer_decay=1.0, warmup=1500, steps=80000, head='uper', aux=1,
        resize='short_side')
  # intern_vit_6b/full_tuning/upernet_intern_vit_6b_504_80k_ade20k_bs16_lr4e-5.py
  out[('upernet_full', '224')] = dict(
      depth=48, pretrain_size=224, out_indices=[11, 23, 35, 47], drop_path=0.4, freeze=False,
      weight_decay=0.05, layer_decay=0.95, warmup=1500, steps=80000, head='uper', aux=2,
      resize='short_side')
  # intern_vit_6b_448px_v*/full_tuning/upernet_intern_vit_6b_448px_v*_504_80k_ade20k_bs16_lr4e-5.py
  for v in _448:
    out[('upernet_full', v)] = dict(
        depth=45, pretrain_size=448, out_indices=[11, 22, 33, 44], drop_path=0.4, freeze=False,
        weight_decay=0.05, layer_decay=0.95, warmup=1500, steps=80000, head='uper', aux=2,
        resize='short_side')
  # intern_vit_6b/few_shot/linear_intern_vit_6b_504_{5k,10k,20k,40k,80k}_ade20k_bs16_lr4e-5_1of{16,8,4,2,1}.py
  # with _base_/datasets/ade20k_504x504_1of{16,8,4,2}.py (test: Resize keep_ratio) and
  # ade20k_504x504.py for 1of1 (test: SETR_Resize); no 448px few-shot files exist.
  for n, steps, warmup in ((16, 5000, 100), (8, 10000, 200), (4, 20000, 400), (2, 40000, 800),
                           (1, 80000, 1500)):
    out[(f'fewshot:1of{n}', '224')] = dict(
        depth=48, pretrain_size=224, out_indices=[47], drop_path=0.4, freeze=False,
        weight_decay=0.05, layer_decay=0.95, warmup=warmup, steps=steps, head='linear', aux=None,
        resize='short_side' if n == 1 else 'fit', fraction=n)
  # intern_vit_6b/vit_adapter/upernet_intern_vit_adapter_6b_512_80k_ade20k_bs16_lr4e-5.py
  # with _base_/datasets/ade20k.py (crop 512, Resize img_scale (2048, 512), test
  # SETR_Resize with ResizeToMultiple commented out), _base_/models/upernet_r50.py
  # (auxiliary_head in_index 2) and InternViTAdapter's defaults (vit_adapter.py:
  # conv_inplane 64, n_points 4, deform_num_heads 25); the adapter's out_indices
  # default (0, 1, 2, 3) means its four maps. Only the 224px weights.
  out[('upernet_adapter', '224')] = dict(
      depth=48, pretrain_size=224, out_indices=None, drop_path=0.0, freeze=True,
      weight_decay=0.05, layer_decay=0.95, warmup=1500, steps=80000, head='uper', aux=2,
      resize='short_side', crop=512, scale=(2048, 512), stride=341, size_divisor=0, patch=16,
      with_fpn=False,
      adapter=dict(interaction_indexes=[[0, 11], [12, 23], [24, 35], [36, 47]], conv_inplane=64,
                   n_points=4, deform_num_heads=25, injector_init_values=0.0, cffn_ratio=0.25,
                   deform_ratio=0.25),
      vit_init_values=0.1)  # init_values=0.0 there goes to the adapter; the ViT keeps 0.1
  return out


CONFIGS = _files()
