"""What every runtime is opened with: one backend-neutral config, with each runtime's own options
beside it (``onnxruntime``), built once from the settings (app.repository.configs)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from app.runtimes.providers import GpuOptions, ProviderPlan


@dataclass(frozen=True)
class OrtOptions:
    """ONNX Runtime's own options (app.runtimes.onnxruntime)."""

    spinning: str  # off | adaptive | in_run | always: when ORT's threads may busy-wait for work
    graph_optimization: str  # disable | basic | extended | all
    gpu: GpuOptions


@dataclass(frozen=True)
class RuntimeConfig:
    model_path: Path
    backend: str  # auto | onnxruntime | openvino (app.runtimes.registry)
    precision: str  # auto | fp32 | fp16 | bf16 | int8 (app.runtimes.providers, .registry)
    bf16: bool  # whether auto may compute an fp32 file in bf16 where the CPU has it
    # The execution providers the setting accepts that are installed, planned once
    # (app.runtimes.providers): ONNX Runtime opens them; the others serve on the CPU.
    providers: ProviderPlan
    lanes: int  # batches computing at once: ONNX Runtime's lanes, OpenVINO's streams
    intra_op_threads: int  # threads of one run; 0: the runtime picks
    # Threads for a lone batch: all the lanes' threads together, as a lone batch has their cores
    # to itself (ONNX Runtime's spinning session, OpenVINO's compiled model).
    alone_threads: int
    buckets: tuple[int, ...]  # the batch sizes a version runs: what auto times and chooses for
    reference_check: bool  # false: serve without checking the file's reference outputs
    tuning: str  # cache | retime | off: whether auto reuses its timings (app.runtimes.tuning)
    tuning_cache_dir: Path  # where they are kept
    onnxruntime: OrtOptions
