"""prunelab on your own model and your own training loop (a small CNN, not in the zoo)."""

import torch
from sklearn.datasets import load_digits
from torch import nn

import prunelab

torch.manual_seed(0)
digits = load_digits()
x = torch.tensor(digits.images, dtype=torch.float32).unsqueeze(1) / 16.0  # (N, 1, 8, 8)
y = torch.tensor(digits.target)
model = nn.Sequential(
    nn.Conv2d(1, 16, 3, padding=1), nn.ReLU(), nn.Conv2d(16, 32, 3, padding=1), nn.ReLU(),
    nn.Flatten(), nn.Linear(32 * 8 * 8, 10),
)
optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=1e-4)

# the five prunelab lines: build, prepare, step in your loop, finalize, save
sparsifier = prunelab.Sparsifier(model, criterion="magnitude", granularity="unstructured", allocation="erk",
                                 schedule=prunelab.Cubic(0.9, start_step=50, num_updates=10, frequency=20))
sparsifier.prepare(optimizer)
for step in range(400):
    batch = torch.randint(0, 1500, (64,))
    loss = nn.functional.cross_entropy(model(x[batch]), y[batch])
    optimizer.zero_grad()
    loss.backward()
    optimizer.step()
    sparsifier.step()  # updates masks on the cubic schedule, keeps pruned weights (and Adam state) at zero
masks = sparsifier.finalize()
masks.save("custom_masks.safetensors")

accuracy = (model(x[1500:]).argmax(1) == y[1500:]).float().mean().item()
print(f"held-out accuracy {accuracy:.3f} at sparsity {masks.stats().sparsity:.3f}")
for layer in masks.stats().layers:
    print(f"  {layer.name:<10} {str(layer.shape):<18} kept {layer.kept:>6} / {layer.total:<6} sparsity {layer.sparsity:.3f}")
torch.save(model.state_dict(), "custom_model.pt")  # a plain state_dict: loads into the unpruned architecture
