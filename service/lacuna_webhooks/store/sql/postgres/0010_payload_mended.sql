-- `match` over bodies jsonb refuses only for what one string holds (docs/admin.md, "How
-- `match` reads bodies"). jsonb refuses a \u0000 escape and an unpaired UTF-16 surrogate
-- escape (\ud800 alone) anywhere in a body, so lacuna_payload (0005) read such a body as
-- NULL and no `match` found it, even on a field without either; SQLite and the reference
-- found it. Stored bodies stay byte for byte as signed (bytea): only this reading changes.
-- (Numbered after SQLite's 0009: one number means one change, whatever the dialect.)
--
-- lacuna_payload_mended: the body with every real \u0000 escape and every unpaired surrogate
-- escape (hex in either case) written as \ufffd, as jsonb; NULL when jsonb still refuses it.
-- The body is cut into tokens, left to right: a run without a backslash, or one escape
-- (a surrogate pair, any other \uXXXX, \ and one character, or a lone final \). Cutting from
-- the left keeps escapes apart: in \\u0000 the escape is \\ (a backslash) and "u0000" is
-- text, while in \\\u0000 the \u0000 is a real escape. Only a token that is a whole \u0000
-- or lone-surrogate escape is rewritten; a pair is one token and is kept.
CREATE FUNCTION lacuna_payload_mended(raw bytea) RETURNS jsonb
LANGUAGE plpgsql IMMUTABLE STRICT PARALLEL SAFE AS $fn$
BEGIN
    RETURN (
        SELECT string_agg(
            CASE WHEN t.token[1] ~ $re$^\\u(?:0000|[dD][89a-fA-F][0-9a-fA-F]{2})$$re$
                THEN $re$\ufffd$re$ ELSE t.token[1] END,
            '' ORDER BY t.n)
        FROM regexp_matches(
            convert_from(raw, 'UTF8'),
            $re$\\(?:u[dD][89abAB][0-9a-fA-F]{2}\\u[dD][c-fC-F][0-9a-fA-F]{2}|u[0-9a-fA-F]{4}|.)?|[^\\]+$re$,
            'g') WITH ORDINALITY AS t(token, n)
    )::jsonb;
EXCEPTION WHEN OTHERS THEN
    RETURN NULL;
END
$fn$;

-- A stored body as jsonb: the plain cast, as before, for every body jsonb takes (the common
-- path is that one cast); only a body it refuses pays for lacuna_payload_mended. NULL still
-- for what that cannot mend (not UTF-8, nesting beyond the stack limit, a number numeric
-- cannot hold...): such a row does not match, and never fails the whole search.
CREATE OR REPLACE FUNCTION lacuna_payload(raw bytea) RETURNS jsonb
LANGUAGE plpgsql IMMUTABLE STRICT PARALLEL SAFE AS $fn$
BEGIN
    RETURN convert_from(raw, 'UTF8')::jsonb;
EXCEPTION WHEN OTHERS THEN
    RETURN lacuna_payload_mended(raw);
END
$fn$;
