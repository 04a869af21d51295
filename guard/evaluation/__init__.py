"""Policy evaluation: replay labelled conversations through the guard and measure what a policy does."""
