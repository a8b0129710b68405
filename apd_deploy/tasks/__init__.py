"""Tasks with exactly checkable answers, for `apd-deploy eval` and for training the demo pair."""
