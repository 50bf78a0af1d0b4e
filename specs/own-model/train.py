"""Train own-model.yaml's MLP on the digits for five epochs, saving a state_dict per epoch under runs/
(the checkpoints trained.yaml analyses). Run: python specs/own-model/train.py"""

from pathlib import Path

import torch
from mlp import make_mlp
from sklearn.datasets import load_digits

runs = Path(__file__).parent / "runs"
runs.mkdir(exist_ok=True)
x, y = load_digits(return_X_y=True)
x, y = torch.tensor(x / 16.0, dtype=torch.float32), torch.tensor(y)  # pixels in [0, 1], as the digits source reads them
net = make_mlp().train()
optimiser = torch.optim.Adam(net.parameters(), lr=1e-2)
for epoch in range(1, 6):
    for start in range(0, len(x), 64):
        loss = torch.nn.functional.cross_entropy(net(x[start : start + 64]), y[start : start + 64])
        optimiser.zero_grad()
        loss.backward()
        optimiser.step()
    torch.save(net.state_dict(), runs / f"epoch_{epoch}.pt")
print(f"saved {runs.name}/epoch_1.pt … epoch_5.pt")
