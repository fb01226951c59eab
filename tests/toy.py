"""A toy LightningModule and DataModule that exercise the training driver without the real models."""

import lightning as L
import torch
from torch.utils.data import DataLoader, TensorDataset

TOY_CONFIG = """
name: toy
seed: 0
model: {target: tests.toy.ToyRegression, params: {learning_rate: 0.1}}
data: {target: tests.toy.ToyData, params: {n: 64, batch_size: 8}}
trainer: {max_steps: 6, accelerator: cpu, devices: 1, enable_model_summary: false, log_every_n_steps: 1, enable_progress_bar: false}
checkpoint: {every_n_train_steps: 2, keep: 2}
"""  # a run config of the two classes below (targets under tests.: LDM_ALLOW_TARGETS=tests. lets a run build them)


class ToyRegression(L.LightningModule):
    """Fits y = 3x + 1 with one linear layer."""

    def __init__(self, learning_rate: float = 0.1, hidden: int = 1):
        super().__init__()
        self.learning_rate = learning_rate
        self.net = torch.nn.Linear(1, hidden)

    def training_step(self, batch, batch_idx):
        x, y = batch
        loss = torch.nn.functional.mse_loss(self.net(x).sum(-1, keepdim=True), y)
        self.log("train/loss", loss)
        return loss

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=self.learning_rate)


class ToyData(L.LightningDataModule):
    """Noise-free samples of the line."""

    def __init__(self, n: int = 64, batch_size: int = 8):
        super().__init__()
        x = torch.linspace(-1, 1, n)[:, None]
        self.dataset = TensorDataset(x, 3 * x + 1)
        self.batch_size = batch_size

    def train_dataloader(self):
        return DataLoader(self.dataset, batch_size=self.batch_size, shuffle=True)
