<?php
// The application's way to rotate (runbook step 5, psap:encrypt:rotate-keys), for comparison:
// fetch a batch of v1 rows over the connection, decrypt and re-encrypt them in PHP with the
// sodium extension, write each row back with its own UPDATE, commit per batch.
//
//   php bench/php_rotate.php "host=/tmp/psap-bench port=5497 dbname=bench user=postgres" TABLE BATCH V1HEX V2HEX
[$_, $dsn, $table, $batch, $k1, $k2] = $argv;
$key = ['v1' => sodium_hex2bin($k1), 'v2' => sodium_hex2bin($k2)];
$db = pg_connect($dsn) or die("connect failed\n");
pg_prepare($db, 'fetch', "SELECT id, title FROM $table WHERE id > $1 AND title LIKE 'v1:%' ORDER BY id LIMIT $batch");
pg_prepare($db, 'write', "UPDATE $table SET title = $1 WHERE id = $2");
$last = 0;
$rotated = 0;
while (true) {
    pg_query($db, 'BEGIN');
    $rows = pg_fetch_all(pg_execute($db, 'fetch', [$last])) ?: [];
    if (!$rows) {
        pg_query($db, 'COMMIT');
        break;
    }
    foreach ($rows as $row) {
        [$version, $body] = explode(':', $row['title'], 2);
        $raw = base64_decode($body, true);
        $nonce = substr($raw, 0, SODIUM_CRYPTO_SECRETBOX_NONCEBYTES);
        $plain = sodium_crypto_secretbox_open(substr($raw, SODIUM_CRYPTO_SECRETBOX_NONCEBYTES), $nonce, $key[$version]);
        if ($plain === false) {
            fwrite(STDERR, "cannot decrypt row {$row['id']}\n");
            exit(1);
        }
        $n2 = random_bytes(SODIUM_CRYPTO_SECRETBOX_NONCEBYTES);
        $new = 'v2:' . base64_encode($n2 . sodium_crypto_secretbox($plain, $n2, $key['v2']));
        pg_execute($db, 'write', [$new, $row['id']]);
        $last = $row['id'];
        $rotated++;
    }
    pg_query($db, 'COMMIT');
}
echo $rotated, "\n";
