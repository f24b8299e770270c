"""The DiTs of a model with several experts, kept where they are needed (training and sampling share it).

    dits = ExpertDits({"high_noise": high, "low_noise": low}, device="cuda", offload=True)
    dit = dits.get(route(experts, t).name)   # on the device; with offload the other one is on the CPU

With `offload` (memory.offload_inactive_dit) only the expert in use is on the device: switching
moves the previous one to the CPU first, so at most one expert's weights occupy device memory.
"""

from __future__ import annotations


class ExpertDits:
    def __init__(self, dits: dict, device, offload: bool):
        self.dits = dict(dits)
        self.device = device
        self.offload = offload and len(self.dits) > 1
        self.active: str | None = None

    def get(self, name: str):
        """Return expert `name`'s DiT on the device."""
        if self.offload and self.active != name:
            from musubi_pipe.memory import move_dit

            for other, dit in self.dits.items():
                if other != name:
                    move_dit(dit, "cpu")
            move_dit(self.dits[name], self.device)
        self.active = name
        return self.dits[name]

    def values(self):
        return self.dits.values()

    def __getitem__(self, name: str):
        return self.dits[name]
