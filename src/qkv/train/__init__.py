"""Training models for a task (translation, language modelling), and the inference side of each task.

``qkv.train`` sits above ``qkv.models`` and ``qkv.data`` and below ``qkv.cli``. :func:`trainer.train` goes
down once and comes back once: the output directory is opened, the task named by ``config.task`` prepares
its data and builds its model, and the :class:`trainer.Trainer` trains what it is handed::

    config         the YAML configuration (task / data / model / training / output), validated
    task           the Task interface: what differs between jobs (data, model, loss, metrics, model files)
    tasks          the registry of tasks (name → class, imported lazily): translation, lm
    trainer        the shared loop: AdamW, schedule, accumulation, clipping, autocast, budget, validation
                   cadence, early stopping, checkpoints and exact resume, DDP
    budget         max_steps / max_epochs / max_time, whichever comes first
    run_dir        the output directory: checked, tidied, the saved config compared on --resume
    run_log        train.log, metrics.jsonl, console, TensorBoard
    export         checkpoint averaging and the atomic export into the model directory
    errors         TrainError, TrainInterrupted
    schedule       warmup + inverse-sqrt / cosine / constant learning rates
    checkpoint_io  atomic safetensors checkpoints, keep-last-k, best, averaging; never unpickles
    ddp            multi-process data parallelism under torchrun
    loss           label-smoothed cross-entropy, padding ignored (translation)
    evaluate       BLEU / chrF (sacrebleu, with signatures) and exact match (translation)
    translate      a translation model directory → translations (greedy or beam), with cross-attention

Modules are imported by name (``from qkv.train.trainer import train``): importing ``qkv.train`` itself loads
nothing.
"""
