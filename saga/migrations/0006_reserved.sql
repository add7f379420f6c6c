-- Placeholder for migration 0006, reserved for the history/operator work on another branch:
-- versions must run 1..n without gaps. DELETE THIS FILE when merging that branch's 0006.
SELECT 1;
