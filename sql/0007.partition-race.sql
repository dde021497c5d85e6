-- depends: 0006.read-api-indexes
-- Concurrent ranges may race to create the same order_events partition. The re-check after the advisory lock
-- can read a stale catalog cache (an advisory lock does not process catalog invalidations), so "already
-- exists" is treated as success instead (tests/test_ingestion_e2e.py::test_ranges_ingested_concurrently...).
CREATE OR REPLACE FUNCTION ensure_order_events_partitions(from_block bigint, to_block bigint, width bigint)
RETURNS integer LANGUAGE plpgsql SECURITY DEFINER SET search_path = public AS $$
DECLARE
    lo bigint := (from_block / width) * width;
    made integer := 0;
    name text;
BEGIN
    WHILE lo <= to_block LOOP
        name := format('order_events_b%s', lpad(lo::text, 12, '0'));
        IF to_regclass(name) IS NULL THEN
            PERFORM pg_advisory_xact_lock(hashtext(name));
            BEGIN
                EXECUTE format('CREATE TABLE %I PARTITION OF order_events FOR VALUES FROM (%s) TO (%s)',
                               name, lo, lo + width);
                made := made + 1;
            EXCEPTION WHEN duplicate_table OR unique_violation THEN
                NULL;  -- another transaction created it first
            END;
        END IF;
        lo := lo + width;
    END LOOP;
    RETURN made;
END $$;
