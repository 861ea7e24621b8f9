"""A Ctrl-C in the middle of a sweep, for the command's tests."""


def interrupt_second_save(monkeypatch, module) -> None:
    """Let ``module._save`` write the first ratio's folder, then raise KeyboardInterrupt on the second."""
    calls = []
    real_save = module._save

    def save_then_interrupt(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real_save(*args, **kwargs)

    monkeypatch.setattr(module, "_save", save_then_interrupt)
