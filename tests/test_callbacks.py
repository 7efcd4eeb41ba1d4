"""fibo's Lightning callbacks on a real (tiny) Trainer run."""

import lightning as L
import torch
from lightning.pytorch.demos.boring_classes import BoringModel

from fibo.callbacks import ModelCheckpoint


class WorseEachEpoch(BoringModel):
    """val/acc1 = 1 / (epoch + 1): only epoch 0 is ever the best."""

    def validation_step(self, batch, batch_idx):
        self.log("val/acc1", 1.0 / (self.current_epoch + 1))
        return super().validation_step(batch, batch_idx)


def test_last_checkpoint_is_the_latest_epoch_not_the_best(tmp_path):
    ckpt = ModelCheckpoint(dirpath=tmp_path, filename="best", monitor="val/acc1", mode="max", save_last=True)
    trainer = L.Trainer(default_root_dir=tmp_path, max_epochs=3, limit_train_batches=2, limit_val_batches=1,
                        callbacks=[ckpt], logger=False, enable_progress_bar=False, enable_model_summary=False)
    trainer.fit(WorseEachEpoch())
    assert sorted(p.name for p in tmp_path.glob("*.ckpt")) == ["best.ckpt", "last.ckpt"]
    assert torch.load(tmp_path / "best.ckpt", weights_only=False)["epoch"] == 0
    last = torch.load(tmp_path / "last.ckpt", weights_only=False)
    assert (last["epoch"], last["global_step"]) == (2, 6)  # Lightning's own callback leaves epoch 0 here
