"""A real (if trivial) pipeline used by core tests: a seeded noise image. It follows the same
contract as pipelines/ so the engine, writer, presets and replay are tested without a model."""

from dataclasses import dataclass

import numpy as np
from PIL import Image

from studio.errors import UsageError
from studio.outputs import Result


@dataclass(frozen=True)
class ToyRequest:
    prompt: str  # text recorded in the output
    model: str = "auto"  # ignored: the toy has no weights
    seed: int | None = None  # noise seed
    steps: int = 1  # recorded, and must be >= 1
    width: int = 8  # image width
    height: int = 8  # image height
    num_outputs: int = 1  # images per request


class ToyPipeline:
    task = "toy"
    request_type = ToyRequest
    loads = 0

    @classmethod
    def load(cls, spec, device):
        cls.loads += 1
        return cls()

    def check_inputs(self, request):
        if request.steps < 1:
            raise UsageError(f"--steps must be at least 1, got {request.steps}", "pass --steps 1 or more")

    def run(self, request, progress):
        for i in range(request.num_outputs):  # one at a time, as the contract recommends
            seed = request.seed + i
            pixels = np.random.default_rng(seed).integers(0, 256, (request.height, request.width, 3), dtype=np.uint8)
            params = {**request.__dict__, "seed": seed}
            yield Result(kind="image", value=Image.fromarray(pixels), params=params)
