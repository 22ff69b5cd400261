"""lora_squeeze: train LoRA adapters on Gemma 3 in JAX/Flax and change their rank with (randomized) SVD.

Paper: "LoRA-Squeeze: Simple and Effective Post-Tuning and In-Tuning Compression of LoRA Modules"
(arXiv 2602.10993). The map of the package (layers, data flow, where a change goes, public contracts) is
``docs/architecture.md``; start with ``lora_squeeze.squeeze`` (the math), then ``models``, ``lora``, ``adapters``.
"""

import os

__version__ = "0.1.0"


def _single_thread_lapack() -> None:
  """Run jaxlib's CPU LAPACK kernels (scipy's bundled OpenBLAS) on one thread.

  Our factorisations are small (r×r cores, tall-skinny QRs), where OpenBLAS threads only add overhead, and
  its spin-waiting threads collapse when the cores are oversubscribed (several processes on a 2-core
  machine): measured here, a batched SVD of eight 128×128 matrices went from 0.02 s to 6-9 s, which looked
  like a hang. XLA's own GEMMs use Eigen threads and are unaffected; numpy's separate OpenBLAS is left
  alone. Set LORA_SQUEEZE_LAPACK_THREADS=N to choose another count, or 0 to leave it untouched.
  """
  threads = int(os.environ.get("LORA_SQUEEZE_LAPACK_THREADS", "1"))
  if threads <= 0:
    return
  try:
    # Lazy: only when a thread count is set, and optional (no scipy or threadpoolctl: nothing to do).
    import scipy.linalg  # noqa: F401  (loads the library jaxlib's LAPACK kernels use)
    import threadpoolctl
  except ImportError:
    return
  controller = threadpoolctl.ThreadpoolController()
  scipy_blas = controller.select(user_api="blas")
  for lib in scipy_blas.lib_controllers:
    if "scipy.libs" in lib.filepath:
      lib.set_num_threads(threads)


_single_thread_lapack()
