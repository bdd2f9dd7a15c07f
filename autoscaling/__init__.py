"""Queue-depth autoscaling policy for the engine deployments (issue 5); nothing here yet."""
