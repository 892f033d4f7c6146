-- What a DBA sees in psql: encrypt/decrypt, keys, and each error with its SQLSTATE.
-- Keys (psap_keys.conf of the regress cluster): v1 and v2 configured, psap.key_version = v1.
\set SHOW_CONTEXT never
CREATE EXTENSION psap_encrypt;
CREATE FUNCTION sqlstate_of(stmt text) RETURNS text LANGUAGE plpgsql AS $$
BEGIN
    EXECUTE stmt;
    RETURN 'ok';
EXCEPTION WHEN OTHERS THEN
    RETURN SQLSTATE || ': ' || SQLERRM;
END $$;

-- Ciphertext made by the application (PHP sodium, here PyNaCl), nonce 00..17, key v1.
SELECT psap_decrypt('v1:AAECAwQFBgcICQoLDA0ODxAREhMUFRYXux6Es8jM3wE7Zv2XqAHv1g2LSjqkvtdi3hzpVxrqZrdjl2aS7UxRz0TW');
SELECT psap_decrypt(psap_encrypt('Ünïcödé — 火災 🚒')) AS round_trip, left(psap_encrypt('x'), 3) AS prefix;
SELECT length(psap_encrypt('')) AS empty_envelope_length, psap_decrypt(psap_encrypt('')) = '' AS empty_ok;
SELECT psap_decrypt(NULL) IS NULL AS strict;
SELECT version, cipher, fingerprint, is_current, status, source, loaded_at IS NOT NULL AS loaded, module, fips_validated FROM psap_keys();
SHOW psap.key_v1;
SHOW psap.key_v3;
SHOW psap.key_version;

-- Errors: message, detail and hint as psql prints them...
SELECT psap_decrypt('Structure fire');
SELECT psap_decrypt('v1:QUJD');
SELECT psap_decrypt('v3:AAECAwQFBgcICQoLDA0ODxAREhMUFRYXux6Es8jM3wE7Zv2XqAHv1g2LSjqkvtdi3hzpVxrqZrdjl2aS7UxRz0TW');
SELECT psap_decrypt('v2:AAECAwQFBgcICQoLDA0ODxAREhMUFRYXux6Es8jM3wE7Zv2XqAHv1g2LSjqkvtdi3hzpVxrqZrdjl2aS7UxRz0TW');
SET psap.key_version = 'v7';
SELECT psap_encrypt('x');
RESET psap.key_version;
SET psap.key_version = 'seven';
SET psap.key_v1 = '00';
-- ...and the SQLSTATE of each.
SELECT stmt, sqlstate_of(stmt) FROM (VALUES
    ('SELECT psap_decrypt(''Structure fire'')'),
    ('SELECT psap_decrypt(''v1:QUJD'')'),
    ('SELECT psap_decrypt(''v1:not base64!'')'),
    ('SELECT psap_decrypt(''v100:AAAA'')'),
    ('SELECT psap_decrypt(''v01:AAAA'')'),
    ('SELECT psap_decrypt(''v3:AAECAwQFBgcICQoLDA0ODxAREhMUFRYXux6Es8jM3wE7Zv2XqAHv1g2LSjqkvtdi3hzpVxrqZrdjl2aS7UxRz0TW'')'),
    ('SELECT psap_decrypt(''v2:AAECAwQFBgcICQoLDA0ODxAREhMUFRYXux6Es8jM3wE7Zv2XqAHv1g2LSjqkvtdi3hzpVxrqZrdjl2aS7UxRz0TW'')'),
    ('SELECT psap_decrypt(psap_encrypt_bytea(''\x00''::bytea))'),
    ('SET psap.key_version = ''v0'''),
    ('SET psap.key_v1 = ''00''')
) AS t(stmt);
