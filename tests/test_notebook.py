"""notebooks/colab_evaluation.ipynb runs top to bottom in DEMO mode (nbclient,
a kernel on this interpreter, outputs in a temporary folder)."""
import json
import os
import sys

import nbclient
import nbformat

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NOTEBOOK = os.path.join(ROOT, 'notebooks', 'colab_evaluation.ipynb')


def _kernel_env(tmp_path) -> dict:
  """This process's environment for the kernel, minus the 8 fake CPU devices of
  conftest.py (the notebook runs as a user would: one device)."""
  env = dict(os.environ)
  flags = [f for f in env.get('XLA_FLAGS', '').split()
           if not f.startswith('--xla_force_host_platform_device_count')]
  env['XLA_FLAGS'] = ' '.join(flags)
  if not flags:
    del env['XLA_FLAGS']
  env['JAX_PLATFORMS'] = 'cpu'
  env['INTERNSEG_NOTEBOOK_WORKDIR'] = str(tmp_path / 'workdir')
  env['IPYTHONDIR'] = str(tmp_path / 'ipython')  # leave ~/.ipython alone
  env['JUPYTER_PATH'] = str(tmp_path / 'jupyter')  # the kernel spec below comes first
  return env


def _write_kernel_spec(tmp_path) -> str:
  """A kernel spec that runs ipykernel on this interpreter (the venv's python),
  whatever other 'python3' specs the machine has."""
  name = 'internseg-test'
  folder = tmp_path / 'jupyter' / 'kernels' / name
  folder.mkdir(parents=True)
  (folder / 'kernel.json').write_text(json.dumps({
      'argv': [sys.executable, '-m', 'ipykernel_launcher', '-f', '{connection_file}'],
      'display_name': 'internseg test', 'language': 'python'}))
  return name


def test_notebook_is_stored_clean():
  nb = nbformat.read(NOTEBOOK, as_version=4)
  nbformat.validate(nb)
  for cell in nb.cells:
    if cell.cell_type == 'code':
      assert not cell.outputs and cell.execution_count is None, 'commit the notebook without outputs'
  source = ''.join(c.source for c in nb.cells)
  assert "'google.colab' in sys.modules" in source and 'DEMO = True' in source


def test_notebook_runs_in_demo_mode(tmp_path, monkeypatch):
  env = _kernel_env(tmp_path)
  monkeypatch.setenv('JUPYTER_PATH', env['JUPYTER_PATH'])  # where nbclient finds kernel specs
  monkeypatch.setenv('JUPYTER_RUNTIME_DIR', str(tmp_path / 'runtime'))  # connection files
  kernel = _write_kernel_spec(tmp_path)
  nb = nbformat.read(NOTEBOOK, as_version=4)
  client = nbclient.NotebookClient(nb, kernel_name=kernel, timeout=600,
                                   resources={'metadata': {'path': ROOT}})
  client.execute(env=env)  # raises CellExecutionError on the first failing cell

  outputs = [o for c in nb.cells if c.cell_type == 'code' for o in c.outputs]
  assert not [o for o in outputs if o.output_type == 'error']
  text = ''.join(o.get('text', '') for o in outputs if o.output_type == 'stream')
  assert 'install skipped' in text and sys.executable in text  # not Colab; this interpreter
  assert 'Summary' in text and 'mIoU' in text  # metrics.format_table
  images = [o for o in outputs if o.output_type == 'display_data' and 'image/png' in o.data]
  assert images  # the panels (IPython Image), or one matplotlib figure where it is installed

  workdir = tmp_path / 'workdir'
  results = json.loads((workdir / 'eval_results.json').read_text())
  assert 0.0 <= results['mIoU'] <= 1.0 and results['num_images'] == 6
  assert len(results['IoU']) == 7
  assert len(list((workdir / 'predictions').glob('*_panel.png'))) == 3
  assert (workdir / 'demo' / 'converted' / 'info.json').is_file()
  hf_info = json.loads((workdir / 'demo' / 'hf_converted' / 'info.json').read_text())
  assert hf_info['format'] == 'safetensors' and len(hf_info['files']) >= 3  # section 3b ran
  assert 'features at blocks' in text
