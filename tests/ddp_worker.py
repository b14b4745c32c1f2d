# SPDX-License-Identifier: Apache-2.0
"""Run by tests/test_training_ddp.py under torchrun (2 CPU processes, gloo):
the training commands through the CLI, one after another in one launch.

    torchrun --nproc_per_node=2 tests/ddp_worker.py DATA_DIR OUT_DIR REF_DIR

REF_DIR holds the single-process runs (teacher, RDM bank) that the students
here distill from, so that each stage is compared with its single-process twin
on the same inputs.
"""
import sys

from cifd_kernels.training.cli import main


def common(data_dir, out):
    return ["--data-dir", data_dir, "--out-dir", out, "--threads", "1", "--no-progress",
            "data.val_size=64", "data.batch_size=64", "train.lr=0.02", "train.epochs=2",
            "model.arch=cnn2", "teacher.arch=cnn4", "rdm.epochs=2", "rdm.batch_size=64"]


def run(argv):
    rc = main(argv)
    if rc:
        raise SystemExit(f"{argv[:3]} exited {rc}")


if __name__ == "__main__":
    data_dir, out, ref = sys.argv[1:4]
    teacher = f"{ref}/fmnist/teacher/model.pt"
    bank = f"{ref}/fmnist/rdms/bank.pt"
    run(["train-teacher", "-c", "fmnist_teacher", *common(data_dir, out), "model.arch=cnn4"])
    run(["train-rdms", *common(data_dir, out), "--teacher", teacher])
    for method in ("scratch", "kd"):
        run(["distill", "--method", method, *common(data_dir, out), "--teacher", teacher])
    run(["distill", "--method", "cifd", *common(data_dir, out), "--teacher", teacher,
         f"cifd.bank={bank}"])
    # Interrupted after one epoch, then resumed: must end where the run above did.
    cut = [*common(data_dir, out), "--teacher", teacher, f"cifd.bank={bank}",
           "run.name=resumed"]
    run(["distill", "--method", "cifd", *cut, "run.stop_after=1"])
    run(["distill", "--method", "cifd", *cut, "--resume"])
