-- A demo orders table for examples/postgres-orders (run with psql "$PG_URL" -f orders.sql).
create table if not exists orders (
  order_id bigint primary key,
  customer_email text not null,
  country text,
  amount numeric(12,2),
  status text not null,
  updated_at timestamptz not null default now()
);
insert into orders
select i, 'customer' || i || '@example.com', (array['DE','FR','US','JP'])[1 + i % 4],
       (i * 7.25)::numeric(12,2), 'placed', now() - interval '1 day' + i * interval '1 second'
from generate_series(1, 1000) as i
on conflict (order_id) do nothing;
