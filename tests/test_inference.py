"""Sliding-window and whole-image inference, test-time augmentation, batching of
many images' windows over the mesh, and the inference API, against plain numpy
references of mmseg's rules."""
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
import torch

from internseg_jax import api, inference, sharding
from internseg_jax.data import transforms
from tests import seg_fixtures as fx


def reference_windows(h, w, crop, stride):
  """mmseg slide_inference's loop, written out."""
  h_grids = max(h - crop + stride - 1, 0) // stride + 1
  w_grids = max(w - crop + stride - 1, 0) // stride + 1
  out = []
  for hi in range(h_grids):
    for wi in range(w_grids):
      y1, x1 = hi * stride, wi * stride
      y2, x2 = min(y1 + crop, h), min(x1 + crop, w)
      y1, x1 = max(y2 - crop, 0), max(x2 - crop, 0)
      out.append((y1, y2, x1, x2))
  return out


@pytest.mark.parametrize('h,w', [(504, 504), (504, 826), (826, 504), (644, 966), (700, 1001),
                                 (504, 505), (300, 400), (504, 300), (1500, 2016)])
def test_slide_windows_match_mmseg(h, w):
  windows = inference.slide_windows(h, w, 504, 322)
  assert windows == reference_windows(h, w, 504, 322)
  cover = np.zeros((h, w), int)
  for y1, y2, x1, x2 in windows:
    assert y2 - y1 == min(504, h) and x2 - x1 == min(504, w)
    cover[y1:y2, x1:x2] += 1
  assert cover.min() >= 1


def eval_config(mode='slide', crop=56, stride=42, windows_per_device=2, **kwargs):
  return ml_collections.ConfigDict({**dict(
      mode=mode, crop_size=crop, stride=stride, windows_per_device=windows_per_device,
      flip=False, scales=(1.0,), resize='short_side', scale=(224, crop), size_divisor=14),
      **kwargs})


def fake_logits(crops):
  """Logits that are a fixed function of each crop's pixels and its size, so
  wrong placement, ordering or averaging shows."""
  h, w = crops.shape[1:3]
  yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
  return np.stack([crops[..., 0] * 1.0, crops[..., 1] + yy / h, crops[..., 2] * xx / w], -1)


def fake_forward(mesh):
  """The same on device, batch-sharded like a real segmentor forward."""
  def fn(x):
    h, w = x.shape[1:3]
    yy = jnp.arange(h, dtype=jnp.float32)[:, None] / h
    xx = jnp.arange(w, dtype=jnp.float32)[None, :] / w
    return jnp.stack([x[..., 0] * 1.0, x[..., 1] + yy, x[..., 2] * xx], -1)
  return jax.jit(fn, out_shardings=sharding.batch_sharding(mesh))


def reference_view_logits(view, ev):
  h, w = view.shape[:2]
  windows = [(0, h, 0, w)] if ev.mode == 'whole' else reference_windows(h, w, ev.crop_size,
                                                                         ev.stride)
  sums, count = np.zeros((h, w, 3)), np.zeros((h, w, 1))
  for y1, y2, x1, x2 in windows:
    sums[y1:y2, x1:x2] += fake_logits(view[None, y1:y2, x1:x2])[0]
    count[y1:y2, x1:x2] += 1
  return sums / count


def reference_predict(image, ev):
  """mmseg's inference (+ aug_test) with the fake logits, in float64."""
  parts = []
  for ratio in ev.scales:
    x = transforms.test_transform(image, ev.resize, tuple(ev.scale), ev.size_divisor, ratio,
                                  ev.crop_size)
    for flip in ((False, True) if ev.flip else (False,)):
      logits = reference_view_logits(x[:, ::-1] if flip else x, ev)
      logits = logits[:, ::-1] if flip else logits
      out = torch.nn.functional.interpolate(
          torch.from_numpy(np.ascontiguousarray(logits)).permute(2, 0, 1)[None],
          size=image.shape[:2], mode='bilinear', align_corners=False)[0].permute(1, 2, 0).numpy()
      parts.append(out)
  if len(parts) == 1:
    return parts[0]
  return np.mean([np.exp(p) / np.exp(p).sum(-1, keepdims=True) for p in parts], 0)


def images(n, seed=0):
  rng = np.random.default_rng(seed)
  sizes = [(45, 61), (56, 56), (70, 140), (30, 100), (61, 45), (56, 99), (120, 57), (33, 33)]
  return [rng.integers(0, 256, size=(*sizes[i % len(sizes)], 3)).astype(np.uint8)
          for i in range(n)]


@pytest.mark.parametrize('mode', ['slide', 'whole'])
@pytest.mark.parametrize('devices', [1, 8])
def test_predict_matches_reference(mode, devices):
  mesh = sharding.make_mesh(devices=jax.devices()[:devices])
  ev = eval_config(mode)
  for image in images(3):
    got = inference.predict(fake_forward(mesh), mesh, image, ev)
    assert got.shape == (*image.shape[:2], 3) and got.dtype == np.float32
    np.testing.assert_allclose(got, reference_predict(image, ev), rtol=1e-5, atol=1e-5)


def test_flip_and_multiscale_average_probabilities():
  mesh = sharding.make_mesh(devices=jax.devices()[:1])
  ev = eval_config(flip=True, scales=(1.0, 1.5))
  image = images(1, seed=2)[0]
  got = inference.predict(fake_forward(mesh), mesh, image, ev)
  np.testing.assert_allclose(got, reference_predict(image, ev), rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(got.sum(-1), 1.0, rtol=1e-5)


@pytest.mark.parametrize('per_device', [1, 3])
def test_many_images_batched_over_the_mesh_equal_one_at_a_time(per_device):
  """Windows of many images (of several shapes: 'fit' leaves some smaller than
  the crop) packed into batches over 8 devices give exactly what one image at
  a time on one device gives."""
  mesh8 = sharding.make_mesh(data=2, fsdp=4)
  mesh1 = sharding.make_mesh(devices=jax.devices()[:1])
  ev = eval_config(resize='fit', windows_per_device=per_device, flip=True)
  batch = images(8, seed=4)
  runner = inference.WindowRunner(fake_forward(mesh8), mesh8, per_device, ev)
  items = [inference.Item(inference.make_views(im, ev), im.shape[:2], extra=i)
           for i, im in enumerate(batch)]
  outs = list(runner.run(items))
  assert [item.extra for item, _ in outs] == list(range(8))  # in order
  for (_, got), image in zip(outs, batch):
    want = inference.predict(fake_forward(mesh1), mesh1, image, ev)
    np.testing.assert_array_equal(got, want)


def test_inference_model_slide_matches_the_reference_segmentor():
  """A real (tiny) segmentor: inference_model's slide inference equals the
  reference segmentor run window by window as mmseg does, at the original size."""
  torch_model = fx.torch_segmentor('uper', seed=11)
  config = fx.tiny_config('uper')
  model = api.init_model(config)
  model.variables = fx.variables_from_torch(torch_model, config)
  image = np.random.default_rng(3).integers(0, 256, size=(50, 90, 3)).astype(np.uint8)
  labels, logits = api.inference_model(model, image, return_logits=True)

  ev = config.eval
  x = transforms.test_transform(image, 'short_side', ev.scale, 14, 1.0, ev.crop_size)
  h, w = x.shape[:2]
  sums, count = np.zeros((h, w, fx.CLASSES)), np.zeros((h, w, 1))
  for y1, y2, x1, x2 in reference_windows(h, w, ev.crop_size, ev.stride):
    sums[y1:y2, x1:x2] += fx.torch_logits(torch_model, x[None, y1:y2, x1:x2])[0]
    count[y1:y2, x1:x2] += 1
  want = torch.nn.functional.interpolate(
      torch.from_numpy(sums / count).permute(2, 0, 1)[None], size=(50, 90), mode='bilinear',
      align_corners=False)[0].permute(1, 2, 0).numpy()
  assert logits.shape == (50, 90, fx.CLASSES) and labels.shape == (50, 90)
  assert labels.dtype == np.int32
  assert fx.rel_l2(logits, want) <= 1e-5
  assert (labels == want.argmax(-1)).mean() > 0.999


def test_inference_rejects_bad_images():
  ev = eval_config()
  with pytest.raises(ValueError, match='uint8 RGB'):
    inference.make_views(np.zeros((10, 10), np.uint8), ev)
  with pytest.raises(ValueError, match='uint8 RGB'):
    inference.make_views(np.zeros((10, 10, 3), np.float32), ev)
