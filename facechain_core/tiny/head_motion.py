"""A tiny (or full-size) SadTalker audio-to-pose checkpoint with random weights, in the published layout.

The network is ``facechain_core.head_motion``'s own (module names as in ``auido2pose_00140-model.pth``),
saved as ``{"model": state_dict, "epoch": 0}`` like SadTalker's checkpoints. Weights are Kaiming-normal
(the default init lets a random decoder's sigmoid flatten the audio's influence to nothing) and the last
layer is scaled so the random poses stay within a few degrees, as real head motion does.
"""
from __future__ import annotations

from pathlib import Path



def build_audio2pose(out_path: Path, full_size: bool = False, seed: int = 0) -> Path:
    import torch
    from torch import nn

    from facechain_core.head_motion import PoseNetSize, build_pose_net

    size = PoseNetSize.full() if full_size else PoseNetSize(audio=(4, 8, 8, 8, 16), unet=(4, 4, 8, 8), mlp=(16, 192))
    torch.manual_seed(seed)
    net = build_pose_net(size)
    for module in net.modules():
        if isinstance(module, (nn.Conv2d, nn.Linear, nn.ConvTranspose2d)):
            nn.init.kaiming_normal_(module.weight, nonlinearity="relu")
    with torch.no_grad():
        net.netG.decoder.pose_linear.weight.mul_(0.05)
        net.netG.decoder.pose_linear.bias.zero_()
    out_path = Path(out_path)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"model": net.state_dict(), "epoch": 0}, out_path)
    return out_path
