"""``wmss run``: the whole method as one resumable job (WMSS.md §5).

SFT → entropies → selection → joint training → extraction → evaluation, the SFT baseline with
the same number of epochs, and the controls; each stage leaves a completion marker, a rerun
skips finished stages and resumes an interrupted one. Then the report.
"""

from megatron_wmss.pipeline.config import CONTROLS, PipelineConfig, load_pipeline

__all__ = ["CONTROLS", "PipelineConfig", "load_pipeline"]
