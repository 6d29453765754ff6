"""Operations: backup, retention, metrics, logging."""
