"""Entry point of a Disco ProcessSession worker (``python -m mlc_quant.disco_worker``).

TVM's own ``tvm.exec.disco_worker`` cannot serve a runtime-only TVM: ``runtime.disco.WorkerProcess``
lives in ``libtvm_runtime_extra.so``, which runtime-only TVM does not load, and the NCCL plugin
and the CUDA runtime must be loaded before the worker's first command. The controller
(:class:`mlc_quant.disco.DiscoEngine`) passes what to load through the environment.
"""
from __future__ import annotations

import os
import sys


def main() -> None:
    if len(sys.argv) != 6:
        print("Usage: <worker_id> <num_workers> <num_groups> <read_fd> <write_fd>")
        return
    from mlc_quant import disco  # pylint: disable=import-outside-toplevel  (registers the worker functions)

    if os.environ.get(disco.ENV_CUDA) == "1":
        disco.load_nccl_plugin(os.environ.get(disco.ENV_PLUGIN))
    disco.disco_module()  # Disco loaded, its Python globals (_import_python_module) registered
    import tvm_ffi  # pylint: disable=import-outside-toplevel

    worker_id, num_workers, num_groups, reader, writer = (int(a) for a in sys.argv[1:])
    tvm_ffi.get_global_func("runtime.disco.WorkerProcess")(worker_id, num_workers, num_groups, reader, writer)


if __name__ == "__main__":
    try:
        main()
    except (OSError, KeyboardInterrupt):
        pass
